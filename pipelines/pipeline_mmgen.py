"""MMGenPipeline: interleaved text-and-image generation with one KV cache (DESIGN.md §5).

The loop is a state machine per row of the batch:

    TEXT      decode tokens until <|image_start|>, EOS or a limit; with a drafter, the row's chunk carries
              drafted tokens after its pending one and the same forward verifies them (DESIGN.md §6);
    IMAGE     forward <|image_start|> and the queries once, then wait with the query states until no row
              is still writing text, so the rows that reached an image draw it together;
    DRAW      run the flow head for N steps with text and image guidance (their branches are forwarded
              once per image), one batched call for all waiting rows, and decode with the VAE;
    FEEDBACK  embed and compress the new latent, append `v.. <|image_end|>` to the cache, back to TEXT.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from safetensors import SafetensorError

from mmgen import drafting
from mmgen.compression import CompressionSpec
from mmgen.config import DEFAULT_MODEL_DIR
from mmgen.flow_head import pad_conditions, stack_with_zeros
from mmgen.image_tokenizer import ImageTokenizer
from mmgen.loading import check_pipeline_folder
from mmgen.model import ImageModules, UnifiedModel
from mmgen.segments import Image, Segment, Text, as_segments
from mmgen.stream import QUERY, VISION, StreamCodec
from mmgen.stream import TEXT as TEXT_TOKEN

from .decoding import BatchCache, Chunk, fresh_forward, sample_tokens

# `dtype` names a pipeline loads in. bfloat16 runs the matrix products at a fraction of fp32's cost on CPUs
# with AVX-512 BF16 or AMX; drafting is token-identical to plain decoding in float32 only.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

TEXT, IMAGE, DRAW, FEEDBACK, DONE = "text", "image", "draw", "feedback", "done"


@dataclass
class InterleavedPipelineOutput(BaseOutput):
    """Per prompt: the interleaved segments, the images alone, and the text alone."""

    segments: list[list[Segment]]
    images: list[list]
    text: list[str]


@dataclass
class StreamEvent:
    """Something a row produced: a piece of text (`text`), a finished image (`image`), or its end (`done`)."""

    row: int
    kind: str
    text: str | None = None
    image: Image | None = None


# Defaults of a generation call, which the command line, the demo and the benchmarks share.
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 3.0
IMAGE_GUIDANCE_SCALE = 1.5
CFG_INTERVAL = (0.0, 1.0)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with separate text and image scales, applied only for t in `interval`.

    With velocities of the full, unconditional and text-only (images dropped) branches:
    v = v_null + s_text·(v_text − v_null) + s_image·(v_full − v_text). Without context images the
    text-only branch equals the full one and this is ordinary CFG.
    """

    text_scale: float
    image_scale: float
    interval: tuple[float, float] = (0.0, 1.0)
    renorm: bool = False

    def applies_at(self, t: float) -> bool:
        return self.interval[0] <= t <= self.interval[1]

    def combine(self, velocities: list[torch.Tensor]) -> torch.Tensor:
        v_full, v_null = velocities[0], velocities[1]
        v_text = velocities[2] if len(velocities) > 2 else v_full
        v = v_null + self.text_scale * (v_text - v_null) + self.image_scale * (v_full - v_text)
        if self.renorm:  # keep the guided velocity no longer than the conditional one
            ratio = v_full.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-6)
            v = v * ratio.clamp(max=1.0)[:, None, None]
        return v


@dataclass
class GenerationStats:
    """What the last call did, for the demo's stats line and the benchmarks.

    `text_forwards` counts, per row, the target passes that gave that row at least one text token, so
    `tau` (text tokens per such pass) is exactly 1.00 for plain decoding and grows with drafting.
    """

    text_tokens: int = 0
    target_forwards: int = 0
    text_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    images: int = 0
    seconds: float = 0.0
    image_seconds: float = 0.0
    prefill_seconds: float = 0.0  # reading the prompts, their images encoded, up to each row's first token
    first_tokens: int = 0  # the text tokens that reading the prompts gave
    tokens_per_context_image: int = 0

    @property
    def text_tokens_per_second(self) -> float:
        return self.text_tokens / max(self.seconds - self.image_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Text tokens/s after the prompts were read, images excluded: the part drafting can speed up."""
        decode_seconds = self.seconds - self.image_seconds - self.prefill_seconds
        return (self.text_tokens - self.first_tokens) / max(decode_seconds, 1e-9)

    @property
    def tau(self) -> float:
        """Mean text tokens per text-decoding target pass (plain decoding: 1.00)."""
        return self.text_tokens / self.text_forwards if self.text_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens the target accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.image_seconds / self.images if self.images else 0.0


@dataclass
class _Row:
    """The state of one prompt of the batch."""

    index: int
    generator: torch.Generator | None
    next_position: int
    text_only_ids: list[int]  # the row's text with images dropped: the image-guidance branch
    has_context_image: bool
    max_new_tokens: int
    phase: str = TEXT
    chunk: Chunk | None = None
    pending_token: int | None = None
    text_run: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    new_tokens: int = 0
    text_passes: int = 0
    images: int = 0
    image_position: int = 0
    text_states: torch.Tensor | None = None  # the newest states of the text since the row's last image
    image_states: torch.Tensor | None = None  # the states of the row's latest context image
    reference: torch.Tensor | None = None  # that image's latent, for a flow head with a reference input
    condition: torch.Tensor | None = None  # the flow-head condition of the image the row waits to draw
    plan: torch.Tensor | None = None  # and its plan map (`UnifiedModel.plan_map`; None: none)
    latent: torch.Tensor | None = None
    asking_from: int = 0  # where in text_only_ids the text since the row's last image starts


def _check_segment(k: int, segment: Segment) -> None:
    """Refuse what would otherwise fail deep inside the tokenizer or the VAE, naming the prompt."""
    if isinstance(segment, Text):
        try:
            segment.text.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates: invalid UTF-8 decoded with surrogateescape
            raise ValueError(
                f"prompt {k} holds text that is not valid Unicode (an unpaired surrogate at character "
                f"{err.start}); was it read from a file or argument that is not UTF-8?"
            ) from None
        return
    if segment.image is not None and 0 in segment.image.size:
        raise ValueError(f"prompt {k} holds an image with no pixels ({segment.image.width}x{segment.image.height})")
    if segment.latent is not None and not torch.isfinite(segment.latent).all():
        raise ValueError(f"prompt {k} holds an image latent with NaN or infinite values")


class MMGenPipeline(DiffusionPipeline):
    """Generates interleaved text and images from a prompt of text and images.

    Components: `backbone` (any transformers causal LM), `tokenizer`, `vae` (diffusers AutoencoderKL or
    AutoencoderTiny), `model` (`ImageModules`: image_in, queries, compressor, flow head), `scheduler`
    (FlowMatchEulerDiscreteScheduler) and an optional `drafter` for speculative text decoding.
    """

    model_cpu_offload_seq = "backbone->model->vae"
    _optional_components = ["drafter"]

    def __init__(self, backbone, tokenizer, vae, model: ImageModules, scheduler: FlowMatchEulerDiscreteScheduler,
                 drafter=None):
        super().__init__()
        self.register_modules(
            backbone=backbone, tokenizer=tokenizer, vae=vae, model=model, scheduler=scheduler, drafter=drafter
        )
        self._unified: UnifiedModel | None = None
        self._drafting_memory: dict = {}  # what drafters keep between calls (n-gram memory, draft LMs)
        self.last_stats = GenerationStats()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, **kwargs) -> MMGenPipeline:
        """Load from a local folder; with no path, the embedded default model. Safetensors only, no hub.
        `dtype` may be a torch dtype or one of the names in `DTYPES`."""
        path = check_pipeline_folder(pretrained_model_name_or_path or DEFAULT_MODEL_DIR)
        if isinstance(kwargs.get("dtype"), str):
            if kwargs["dtype"] not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {kwargs['dtype']!r}")
            kwargs["dtype"] = DTYPES[kwargs["dtype"]]
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("low_cpu_mem_usage", False)
        try:
            pipe = super().from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, SafetensorError) as err:  # a damaged file the checks cannot see
            raise ValueError(f"could not load the model folder {path}: {err}") from None
        return pipe

    @classmethod
    def from_unified(cls, unified: UnifiedModel, tokenizer, drafter=None, sampling_shift: float = 1.0,
                     stochastic_sampling: bool = False) -> MMGenPipeline:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sampling_shift,
                                                    stochastic_sampling=stochastic_sampling)
        pipe = cls(unified.backbone, tokenizer, unified.image_tokenizer.vae, unified.image_modules, scheduler, drafter)
        pipe._unified = unified
        return pipe

    @property
    def unified(self) -> UnifiedModel:
        """The backbone and image modules as one model (built lazily, sharing the components)."""
        if self._unified is None or self._unified.backbone is not self.backbone or (
            self._unified.image_modules is not self.model
        ):
            image_tokenizer = ImageTokenizer(
                self.vae, image_size=self.model.config.image_size, patch_size=self.model.config.patch_size
            )
            self._unified = UnifiedModel(self.backbone, self.model, image_tokenizer)
        return self._unified

    @property
    def codec(self) -> StreamCodec:
        codec = getattr(self, "_codec", None)
        if codec is None or codec.tokenizer is not self.tokenizer:
            codec = self._codec = StreamCodec(self.tokenizer, self.model.config.num_queries)
        return codec

    @property
    def context_length(self) -> int:
        config = self.backbone.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))

    # -- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, prompts, max_new_tokens, num_inference_steps, guidance_scale, image_guidance_scale,
                     cfg_interval, max_images, temperature, top_k, top_p, output_type, generator,
                     cfg_renorm=False, callback_on_step_end=None, image_candidates=1):
        def number(name, value, low, integer=False, allow_equal=True):
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
            if not math.isfinite(value) or value < low or (not allow_equal and value == low):
                raise ValueError(f"{name} must be {'>' if not allow_equal else '>='} {low}, got {value!r}")

        if not prompts:
            raise ValueError("prompt is empty: give text, an image, or a list of them")
        number("max_new_tokens", max_new_tokens, 1, integer=True)
        number("num_inference_steps", num_inference_steps, 1, integer=True)
        # More steps than the scheduler has training timesteps add nothing but time: a huge count would
        # hold the demo's queue for hours.
        max_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps > max_steps:
            raise ValueError(
                f"num_inference_steps must be <= {max_steps} (the scheduler's training timesteps), "
                f"got {num_inference_steps}"
            )
        number("guidance_scale", guidance_scale, 0)
        number("image_guidance_scale", image_guidance_scale, 0)
        number("max_images", max_images, 0, integer=True)
        number("image_candidates", image_candidates, 1, integer=True)
        number("temperature", temperature, 0)
        if top_k is not None:
            number("top_k", top_k, 1, integer=True)
        if top_p is not None:
            number("top_p", top_p, 0, allow_equal=False)
            if top_p > 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if (not isinstance(cfg_interval, (tuple, list)) or len(cfg_interval) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in cfg_interval)
                or not 0 <= cfg_interval[0] <= cfg_interval[1] <= 1):
            raise ValueError(f"cfg_interval must be (low, high) with 0 <= low <= high <= 1, got {cfg_interval!r}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got {generator!r}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts")
        if not isinstance(cfg_renorm, bool):
            raise TypeError(f"cfg_renorm must be True or False, got {cfg_renorm!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")

    def normalize_prompts(self, prompt) -> list[list[Segment]]:
        """Prompts as segment lists. As in diffusers, a list whose items are all strings or lists is a batch
        (one prompt per item); a list holding images or segments at top level is one interleaved prompt."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
            batch = [as_segments(list(p) if isinstance(p, (list, tuple)) else p) for p in prompt]
        else:
            batch = [as_segments(prompt)]
        for k, segments in enumerate(batch):
            if not any(isinstance(s, Image) or s.text.strip() for s in segments):
                raise ValueError(f"prompt {k} is empty: it has no image and no non-whitespace text")
            for segment in segments:
                _check_segment(k, segment)
        return batch

    def encode_images(self, segments: list[Segment]) -> list[Segment]:
        """Fill in latents of given images with the VAE."""
        need = [s for s in segments if isinstance(s, Image) and s.latent is None]
        if need:
            latents = self.unified.image_tokenizer.encode([s.image for s in need])
            for seg, latent in zip(need, latents):
                seg.latent = latent
        return segments

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt,
        max_new_tokens: int = 256,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
        image_guidance_scale: float = IMAGE_GUIDANCE_SCALE,
        cfg_interval: tuple[float, float] = CFG_INTERVAL,
        cfg_renorm: bool = False,
        max_images: int = 4,
        compression: str = "none",
        generated_compression: str | None = None,
        drafter: str | drafting.Drafter | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        image_candidates: int = 1,
    ):
        """Generate for one prompt or a batch. Returns `InterleavedPipelineOutput` (lists per prompt).

        `compression` applies to images entering the context from the prompt, `generated_compression`
        (default: the same) to images the model drew. `cfg_interval` is the range of t (1 = noise) in
        which guidance applies. With `temperature=0` decoding is greedy. `drafter` ("ngram", "draft-lm",
        "draft-lm:PATH", "vision-head" or a `Drafter`) speeds text decoding up without changing its output.
        With `image_candidates=K` > 1 each image is drawn K times and the model keeps the one it reads the
        text that asked for it best from (`pick_candidates`), for K times the flow-head work; a
        `callback_on_step_end` sees the latents of all the candidates, K per image in a row.
        """
        prompts = self.normalize_prompts(prompt)
        segments: list[list[Segment]] = [[] for _ in prompts]
        for event in self.stream(
            prompts, max_new_tokens=max_new_tokens, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, cfg_interval=cfg_interval,
            cfg_renorm=cfg_renorm, max_images=max_images, compression=compression,
            generated_compression=generated_compression, drafter=drafter, temperature=temperature, top_k=top_k,
            top_p=top_p, generator=generator, output_type=output_type, callback_on_step_end=callback_on_step_end,
            image_candidates=image_candidates,
        ):
            out = segments[event.row]
            if event.kind == "text":
                if out and isinstance(out[-1], Text):
                    out[-1] = Text(out[-1].text + event.text)
                else:
                    out.append(Text(event.text))
            elif event.kind == "image":
                out.append(event.image)
        images = [[self._image_output(s, output_type) for s in row if isinstance(s, Image)] for row in segments]
        text = ["".join(s.text for s in row if isinstance(s, Text)) for row in segments]
        if not return_dict:
            return segments, images, text
        return InterleavedPipelineOutput(segments=segments, images=images, text=text)

    @staticmethod
    def _image_output(segment: Image, output_type: str):
        if output_type == "latent":
            return segment.latent
        if output_type == "np":
            return np.asarray(segment.image, dtype=np.float32) / 255.0
        return segment.image

    @torch.no_grad()
    def stream(
        self,
        prompt,
        max_new_tokens: int = 256,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
        image_guidance_scale: float = IMAGE_GUIDANCE_SCALE,
        cfg_interval: tuple[float, float] = CFG_INTERVAL,
        cfg_renorm: bool = False,
        max_images: int = 4,
        compression: str = "none",
        generated_compression: str | None = None,
        drafter: str | drafting.Drafter | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        image_candidates: int = 1,
    ) -> Iterator[StreamEvent]:
        """The generation loop as a generator of `StreamEvent`s, in the order things are produced."""
        prompts = self.normalize_prompts(prompt)
        self.check_inputs(prompts, max_new_tokens, num_inference_steps, guidance_scale, image_guidance_scale,
                          cfg_interval, max_images, temperature, top_k, top_p, output_type, generator,
                          cfg_renorm, callback_on_step_end, image_candidates)
        guidance = Guidance(guidance_scale, image_guidance_scale, tuple(cfg_interval), cfg_renorm)
        compression = str(CompressionSpec.parse(compression))
        generated_compression = str(CompressionSpec.parse(generated_compression or compression))
        ids = self.codec.ids
        banned = tuple(t for t in (ids.image_end, ids.image_pad, ids.pad) if t != ids.eos)
        sampling = drafting.Sampling(temperature, top_k, top_p, banned, stops=(ids.eos, ids.image_start))
        draft = self._resolve_drafter(drafter)
        model = self.unified
        if any(m.training for m in model.modules()):  # eval() sets a flag on every module: skip it when none trains
            model.eval()
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        self.last_stats = stats = GenerationStats()
        started = time.perf_counter()

        # 1. Encode the prompts and prefill the cache.
        cache = BatchCache(model, len(prompts))
        rows: list[_Row] = []
        chunks: list[Chunk] = []
        for k, segments in enumerate(prompts):
            try:
                self.encode_images(segments)
            except (OSError, ValueError) as err:
                raise ValueError(f"prompt {k} holds an image that cannot be read: {err}") from None
            chunk, row = self._prefill_chunk(k, segments, compression, generators[k], max_new_tokens)
            if len(chunk) + max_new_tokens > self.context_length:
                raise ValueError(
                    f"prompt {k} is {len(chunk)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                    f"model's context of {self.context_length} tokens"
                )
            chunks.append(chunk)
            rows.append(row)
        stats.tokens_per_context_image = model.image_modules.compressor.num_tokens(compression)
        hidden = cache.forward(chunks)
        stats.target_forwards += 1
        for row, chunk in zip(rows, chunks):
            self._keep_text_states(row, hidden[row.index][self._text_since_image(chunk):])
            self._keep_image_states(row, chunk, hidden[row.index])
        if draft is not None:
            draft.start(len(rows), sampling)
            for row, chunk in zip(rows, chunks):
                self._tell_drafter(draft, row.index, chunk, hidden[row.index])
        for row, (tokens, _) in zip(rows, self._choose_tokens(rows, hidden, {}, max_images, sampling)):
            self._take_tokens(row, tokens)
        stats.prefill_seconds = time.perf_counter() - started
        stats.first_tokens = sum(r.new_tokens for r in rows)

        # 2. Advance every row by one step of its phase until all are done.
        while True:
            yield from self._emit_text(rows)
            active = [r for r in rows if r.phase != DONE]
            if not active:
                break
            drafts = self._propose(draft, [r for r in active if r.phase == TEXT])
            for row in active:
                if row.phase == TEXT:
                    row.chunk = self._text_chunk(row, drafts.get(row.index))
                elif row.phase == IMAGE:
                    row.chunk = self._query_chunk(row)
                # A row in FEEDBACK already holds its chunk: the image it just drew; a row in DRAW waits.
            phases = {r.index: r.phase for r in active}
            offset = len(cache)
            hidden = cache.forward([r.chunk if r.phase in (TEXT, IMAGE, FEEDBACK) else None for r in rows])
            stats.target_forwards += 1
            speaking = [r for r in active if phases[r.index] in (TEXT, FEEDBACK)]
            entering = [r for r in active if phases[r.index] == IMAGE]
            chosen = self._choose_tokens(speaking, [hidden[r.index] for r in speaking], drafts, max_images, sampling)
            for row, (tokens, path) in zip(speaking, chosen):
                if phases[row.index] == FEEDBACK:
                    row.text_states = None  # the image just appended ends the row's text before the next image
                    self._keep_image_states(row, row.chunk, hidden[row.index])
                consumed = self._take_tokens(row, tokens)
                kept = [0, *path[:consumed]]  # where in a TEXT chunk the tokens now in the context sit
                if phases[row.index] == TEXT:
                    self._keep_text_states(row, hidden[row.index][kept])
                if row.index in drafts:
                    # Verification: drafted tokens that were not accepted leave the context for good.
                    verified = len(row.chunk) - 1
                    cache.hide(row.index, [offset + k for k in range(1, verified + 1) if k not in kept])
                    draft.feedback(row.index, verified, len(tokens) - 1)
                    stats.drafted_tokens += verified
                    stats.accepted_tokens += len(tokens) - 1
                if draft is not None:
                    self._tell_drafter(draft, row.index, row.chunk, hidden[row.index],
                                       kept if phases[row.index] == TEXT else None)
            cache.trim()
            if draft is not None:
                for row in entering:
                    self._tell_drafter(draft, row.index, row.chunk, hidden[row.index])
            for row in entering:
                states = hidden[row.index]  # <|image_start|>, then the queries
                self._keep_text_states(row, states[:1])
                row.condition = model.head_condition(states[-model.num_queries:], row.text_states, row.image_states)
                if model.head_plan:  # read from the text since the row's last image, through its <|image_start|>
                    since = row.text_only_ids[row.asking_from:] + [self.codec.ids.image_start]
                    row.plan = model.plan_map(row.text_states, self.codec.plan_entries(since))
                row.text_states = None
                row.phase = DRAW
            # Drawing dominates the cost of a step, so rows that reach an image wait for the rest of the batch:
            # one batched flow-head call per step then serves them all. Waiting changes no row's output.
            drawing = [r for r in rows if r.phase == DRAW]
            if drawing and all(r.phase in (DRAW, DONE) for r in rows):
                yield from self._image_phase(drawing, num_inference_steps, guidance, output_type,
                                             callback_on_step_end, generated_compression, image_candidates)
        stats.text_tokens = sum(r.new_tokens for r in rows)
        stats.text_forwards = sum(r.text_passes for r in rows)
        stats.seconds = time.perf_counter() - started
        if draft is not None:
            draft.finish()
        for row in rows:
            yield StreamEvent(row=row.index, kind="done")

    # -- steps of the loop ----------------------------------------------------------------------
    def _prefill_chunk(self, index: int, segments: list[Segment], compression: str, generator,
                       max_new_tokens: int) -> tuple[Chunk, _Row]:
        model, codec = self.unified, self.codec
        counts = [model.image_modules.compressor.num_tokens(compression) for s in segments if isinstance(s, Image)]
        encoded = codec.encode(segments, counts, compressions=[compression] * len(counts))
        spans = [(0, span) for span in encoded.spans]
        embeds = model.embed(encoded.input_ids[None].to(model.device), spans, encoded.latents)[0]
        keep = torch.ones(len(encoded), dtype=torch.bool)
        chunk = Chunk(embeds=embeds, positions=encoded.position_ids.to(model.device), keep=keep.to(model.device),
                      ids=encoded.input_ids.tolist(), modality=encoded.modality.tolist())
        text_ids = [int(t) for t, m in zip(encoded.input_ids, encoded.modality) if m == 0]
        image_marks = {codec.ids.image_start, codec.ids.image_end}
        text_only_ids = [t for t in text_ids if t not in image_marks]
        row = _Row(
            index=index,
            generator=generator,
            next_position=encoded.next_position,
            text_only_ids=text_only_ids,
            asking_from=len(text_only_ids) - (len(chunk) - self._text_since_image(chunk)),
            has_context_image=bool(encoded.spans),
            max_new_tokens=max_new_tokens,
            reference=encoded.latents[-1] if encoded.latents and model.head_reference else None,
        )
        return chunk, row

    # -- text decoding and drafting ------------------------------------------------------------------
    def _resolve_drafter(self, drafter) -> drafting.Drafter | None:
        """The drafter asked for: a `Drafter`, or a name, which gets a fresh one for this call."""
        if drafter is None or isinstance(drafter, drafting.Drafter):
            return drafter
        if not isinstance(drafter, str):
            raise ValueError(
                f"drafter must be a name ({', '.join(drafting.DRAFTER_NAMES)}) or a Drafter, got {type(drafter).__name__}"
            )
        return drafting.build_drafter(drafter, self, self._drafting_memory)

    def _propose(self, draft: drafting.Drafter | None, rows: list[_Row]) -> dict[int, drafting.Draft]:
        """Drafted tokens for TEXT rows (by row index), clipped to what the row may still emit."""
        if draft is None or not rows:
            return {}
        ids = self.codec.ids
        requests = []
        for row in rows:
            room = min(row.max_new_tokens - row.new_tokens, self.context_length - row.next_position - 2)
            if room > 0:
                requests.append(drafting.DraftRequest(row.index, row.pending_token, row.next_position, room))
        if not requests:
            return {}
        stop = {ids.eos, ids.image_start, ids.image_end, ids.image_pad, ids.pad}
        vocab = self.unified.backbone.get_output_embeddings().weight.shape[0]
        out = {}
        for request, proposal in zip(requests, draft.propose(requests)):
            proposal = drafting.clip_draft(proposal, request.max_tokens, stop, vocab)
            if proposal.tokens:
                out[request.row] = proposal
        return out

    def _tell_drafter(self, draft: drafting.Drafter, index: int, chunk: Chunk, hidden: torch.Tensor,
                      positions: list[int] | None = None) -> None:
        """Show the drafter the kept positions of a chunk the target just ran (among `positions`, in order;
        None: all)."""
        keep = chunk.keep.tolist()
        kept = [i for i in (range(len(chunk)) if positions is None else positions) if keep[i]]
        draft.extend(index, drafting.ContextUpdate(
            ids=[chunk.ids[i] for i in kept],
            positions=chunk.positions[kept].tolist(),
            modality=[chunk.modality[i] for i in kept],
            hidden=hidden[kept],
        ))

    def _choose_tokens(self, rows: list[_Row], hidden: list[torch.Tensor], drafts: dict[int, drafting.Draft],
                       max_images: int, sampling: drafting.Sampling) -> list[tuple[list[int], list[int]]]:
        """The tokens each row emits after a forward (its accepted drafted tokens, then the target's own), and
        where in its chunk the accepted drafted ones sit.

        `hidden[k]` holds the hidden states of row k's chunk; a drafted row's chunk is [pending, d_1..d_n,
        alternatives] (`drafting.draft_tree`). Without drafts this is plain decoding: one token from the last
        position.
        """
        if not rows:
            return []
        proposals = [drafts.get(r.index) for r in rows]
        lengths = [len(p.tokens) if p is not None else 0 for p in proposals]
        width = max(lengths)
        chain_ends = [1 + n if p is not None else len(h) for h, n, p in zip(hidden, lengths, proposals)]
        states = torch.stack([
            torch.cat([h[end - n - 1: end], h.new_zeros(width - n, h.shape[-1])])
            for h, n, end in zip(hidden, lengths, chain_ends)
        ])
        logits = self._allowed_logits(rows, states, max_images, sampling)  # (B, width + 1, V)
        generators = [r.generator for r in rows]
        if width == 0:
            tokens = sample_tokens(logits[:, 0], sampling.temperature, sampling.top_k, sampling.top_p, generators)
            return [([t], []) for t in tokens.tolist()]
        device = logits.device
        drafted = torch.tensor([(p.tokens if p else []) + [0] * (width - n) for p, n in zip(proposals, lengths)],
                               device=device)
        draft_probs = None
        if not sampling.greedy and any(p is not None and p.probs is not None for p in proposals):
            one_hot = torch.nn.functional.one_hot(drafted, logits.shape[-1]).float()
            draft_probs = torch.stack([
                torch.cat([p.probs.float(), one_hot[k, n:]]) if p is not None and p.probs is not None else one_hot[k]
                for k, (p, n) in enumerate(zip(proposals, lengths))
            ])
        accepted, following = drafting.verify_drafts(
            logits, drafted, torch.tensor(lengths, device=device), sampling, generators, draft_probs
        )
        chosen = []
        for k, (a, t) in enumerate(zip(accepted.tolist(), following.tolist())):
            tokens, path = drafted[k, :a].tolist(), list(range(1, a + 1))
            alternative = drafting.accepted_alternative(proposals[k], a, t) if proposals[k] is not None else None
            if alternative is not None and sampling.greedy:
                # The target chose a token drafted beside the rejected one: it was verified in this pass too,
                # so the target's token after it comes from its own state.
                tokens.append(t)
                path.append(1 + alternative)
                state = hidden[k][1 + alternative][None, None]
                t = int(self._allowed_logits(rows[k: k + 1], state, max_images, sampling)[0, 0].argmax())
            chosen.append((tokens + [t], path))
        return chosen

    def _allowed_logits(self, rows: list[_Row], states: torch.Tensor, max_images: int,
                        sampling: drafting.Sampling) -> torch.Tensor:
        """The target's logits (B, T, V) at states (B, T, d) of `rows`, masked as decoding masks them: the
        sampling's banned tokens, and `<|image_start|>` for a row that has drawn `max_images`."""
        logits = sampling.mask(self.unified.logits(states))
        for k, row in enumerate(rows):
            if row.images >= max_images:
                logits[k, :, self.codec.ids.image_start] = float("-inf")
        return logits

    def _take_tokens(self, row: _Row, tokens: list[int]) -> int:
        """Accept a row's emitted tokens in order until one ends its TEXT phase; returns how many drafted
        tokens (already in the cache) it kept, all but the last token being drafted ones."""
        before, consumed = row.new_tokens, 0
        for k, token in enumerate(tokens):
            self._accept_token(row, token)
            if row.phase != TEXT or k == len(tokens) - 1:
                break
            row.text_only_ids.append(token)  # a drafted token: in the cache already, so no longer pending
            row.next_position += 1
            consumed += 1
        if row.new_tokens > before:
            row.text_passes += 1
        return consumed

    def _accept_token(self, row: _Row, token: int) -> None:
        ids = self.codec.ids
        at_limit = row.next_position + 1 >= self.context_length
        if token == ids.eos or at_limit:
            row.phase = DONE
            return
        if token == ids.image_start:
            row.phase = IMAGE
            return
        row.pending_token = token
        row.text_run.append(token)
        row.new_tokens += 1
        row.phase = DONE if row.new_tokens >= row.max_new_tokens else TEXT

    def _text_chunk(self, row: _Row, proposal: drafting.Draft | None = None) -> Chunk:
        """The pending token, followed by the drafted tokens to verify if there are any (a chain, or a tree:
        `drafting.draft_tree`)."""
        model = self.unified
        drafted, depths, sees = drafting.draft_tree(proposal) if proposal is not None else ([], [], None)
        tokens = [row.pending_token] + drafted
        n = len(tokens)
        chunk = Chunk(
            embeds=model.text_embeddings(torch.tensor(tokens, device=model.device)),
            positions=row.next_position + torch.tensor([0, *depths], device=model.device),
            keep=torch.ones(n, dtype=torch.bool, device=model.device),
            ids=tokens,
            modality=[TEXT_TOKEN] * n,
            sees=None if sees is None else sees.to(model.device),
        )
        row.text_only_ids.append(row.pending_token)
        row.next_position += 1
        return chunk

    def _keep_text_states(self, row: _Row, states: torch.Tensor) -> None:
        """Remember the newest text states of a row, as many as its flow head reads."""
        limit = self.unified.head_text_tokens
        if limit and len(states):
            kept = states if row.text_states is None else torch.cat([row.text_states, states])
            row.text_states = kept[-limit:]

    def _keep_image_states(self, row: _Row, chunk: Chunk, states: torch.Tensor) -> None:
        """Remember the states of the newest image a chunk brings into a row's context, for a flow head that
        reads the latest context image."""
        if self.unified.head_image_tokens:
            tokens = self._last_image_tokens(chunk)
            if tokens is not None:
                row.image_states = states[tokens]

    @staticmethod
    def _last_image_tokens(chunk: Chunk) -> slice | None:
        """Where the vision tokens of a chunk's last image sit in it (None: it holds no image)."""
        visions = [k for k, m in enumerate(chunk.modality) if m == VISION]
        if not visions:
            return None
        first = visions[-1]
        while first and chunk.modality[first - 1] == VISION:
            first -= 1
        return slice(first, visions[-1] + 1)

    def _text_since_image(self, chunk: Chunk) -> int:
        """Index of a prefill chunk's first token after its last image (0: it holds none)."""
        tokens = self._last_image_tokens(chunk)
        return tokens.stop + 1 if tokens is not None else 0  # past the image's `<|image_end|>`

    def _query_chunk(self, row: _Row) -> Chunk:
        row.image_position = row.next_position
        return self._start_and_queries(row.next_position)

    def _start_and_queries(self, position: int) -> Chunk:
        """`<|image_start|>` (kept) and the queries (read-out only) at the image's shared position."""
        model = self.unified
        start = model.text_embeddings(torch.tensor([self.codec.ids.image_start], device=model.device))
        q = model.num_queries
        return Chunk(
            embeds=torch.cat([start, model.query_embeddings(1)[0].to(start.dtype)]),
            positions=torch.tensor([position] + [position + 1] * q, device=model.device),
            keep=torch.tensor([True] + [False] * q, device=model.device),
            ids=[self.codec.ids.image_start] + [self.codec.ids.image_pad] * q,
            modality=[TEXT_TOKEN] + [QUERY] * q,
        )

    def _feedback_chunk(self, row: _Row, compression: str) -> Chunk:
        """The generated image's compressed tokens and `<|image_end|>`, appended to the context."""
        model, ids = self.unified, self.codec.ids
        vision = model.image_embeddings(row.latent[None], compression)[0]
        end = model.text_embeddings(torch.tensor([ids.image_end], device=model.device))
        embeds = torch.cat([vision.to(end.dtype), end])
        p = row.image_position
        positions = torch.tensor([p + 1] * vision.shape[0] + [p + 2], device=model.device)
        row.next_position = p + 3
        m = vision.shape[0]
        return Chunk(embeds=embeds, positions=positions, keep=torch.ones(len(positions), dtype=torch.bool,
                                                                           device=model.device),
                     ids=[ids.image_pad] * m + [ids.image_end], modality=[VISION] * m + [TEXT_TOKEN])

    def branch_conds(self, image_positions: list[int], text_only_ids: list[list[int]] | None):
        """Flow-head conditions, one per row, of the unconditional branch (the queries see only their
        `<|image_start|>`) and of the text-only branch (each row's text with every image dropped), each
        forwarded once per image."""
        model = self.unified
        q = model.num_queries
        null_chunks = [self._start_and_queries(p) for p in image_positions]
        null = [model.head_condition(h[-q:], h[:-q]) for h in fresh_forward(model, null_chunks)]
        if text_only_ids is None:
            return null, None
        text_chunks = []
        for token_ids in text_only_ids:
            ids = torch.tensor(token_ids, device=model.device, dtype=torch.long)
            tail = self._start_and_queries(len(ids))
            text_chunks.append(Chunk(
                embeds=torch.cat([model.text_embeddings(ids), tail.embeds]),
                positions=torch.cat([torch.arange(len(ids), device=model.device), tail.positions]),
                keep=torch.cat([torch.ones(len(ids), dtype=torch.bool, device=model.device), tail.keep]),
            ))
        return null, [model.head_condition(h[-q:], h[:-q]) for h in fresh_forward(model, text_chunks)]

    def initial_noise(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Patch tokens of pure noise, one image per generator, in the flow head's dtype (drawn in float32, so
        a seed gives the same noise in every dtype)."""
        tokenizer = self.unified.image_tokenizer
        shape = (tokenizer.latent_channels, tokenizer.latent_size, tokenizer.latent_size)
        noise = [torch.randn(shape, generator=g, device=self.unified.device) for g in generators]
        return tokenizer.patchify(torch.stack(noise)).to(self.unified.image_modules.queries.dtype)

    def denoise(self, x: torch.Tensor, branches: list[torch.Tensor], guidance: Guidance, num_inference_steps: int,
                callback_on_step_end: Callable | None = None, velocity_fn: Callable | None = None,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """Integrate the flow from noise `x` (B, N, token_dim) to a clean latent with guided Euler steps.

        `branches` holds the conditions of each guidance branch, one (C, d) per image, as [full] or
        [full, null] or [full, null, text-only]; `velocity_fn(x, t, branches) -> list of velocities`
        defaults to one batched call of the flow head without a reference (`head_velocities`; the benchmark
        swaps in an in-backbone loop). A scheduler with `stochastic_sampling` draws fresh noise at every
        step from each image's generator (`step_generators`).
        """
        model = self.unified
        velocity_fn = velocity_fn or self.head_velocities()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=model.device)
        step_generators = self.step_generators(generators, len(x)) if scheduler.config.stochastic_sampling else None
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, timestep in enumerate(scheduler.timesteps):
                t = scheduler.sigmas[i].to(x.dtype).expand(x.shape[0])
                if len(branches) > 1 and guidance.applies_at(float(t[0])):
                    v = guidance.combine(velocity_fn(x, t, branches))
                else:
                    v = velocity_fn(x, t, branches[:1])[0]
                # In float32, so that a seed gives the same stochastic steps in every dtype.
                step = scheduler.step(v.float(), timestep, x.float(), generator=step_generators, return_dict=False)
                x = step[0].to(x.dtype)
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, i, timestep, {"latents": x})
                    if result and "latents" in result:
                        x = result["latents"]
                bar.update()
        return x

    def step_generators(self, generators: list[torch.Generator | None] | None, batch: int) -> list[torch.Generator]:
        """One generator per image for the noise of stochastic flow steps: the image's own, or, where it has
        none, one seeded from torch's global generator (as `initial_noise` draws from it)."""
        generators = generators or [None] * batch
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} images")
        device = self.unified.device
        return [g if g is not None else torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
                for g in generators]

    def head_velocities(self, reference: torch.Tensor | None = None, plan: torch.Tensor | None = None) -> Callable:
        """`denoise`'s default velocity function: one batched flow-head call over all branches.

        `reference` (B, N, token_dim), from `UnifiedModel.reference_patches`, and `plan` (B, N, d), the rows'
        `UnifiedModel.plan_map`s, go to the full branch alone: the guidance branches see no context image and
        no plan, as their training counterparts do."""

        padded = {}  # (input, branch count) -> that input for all branches, built once rather than at every step

        def full_branch_only(name: str, full: torch.Tensor | None, n: int) -> torch.Tensor | None:
            if full is not None and (name, n) not in padded:
                padded[name, n] = torch.cat([full, full.new_zeros((n - 1) * len(full), *full.shape[1:])])
            return padded.get((name, n))

        def velocities(x: torch.Tensor, t: torch.Tensor, branches: list) -> list[torch.Tensor]:
            n = len(branches)
            cond, mask = pad_conditions([c for branch in branches for c in branch])
            return list(self.unified.velocity(x.repeat(n, 1, 1), t.repeat(n), cond, mask,
                                              full_branch_only("reference", reference, n),
                                              full_branch_only("plan", plan, n)).chunk(n))

        return velocities

    def _image_phase(self, rows: list[_Row], num_inference_steps: int, guidance: Guidance, output_type: str,
                     callback_on_step_end, generated_compression: str,
                     image_candidates: int = 1) -> Iterator[StreamEvent]:
        """Draw one image for each row in `rows` from its query states, then queue its feedback chunk. With
        `image_candidates` K > 1 each row draws K in one batch (row-major) and keeps the best (`pick_candidates`)."""
        started = time.perf_counter()
        tokenizer = self.unified.image_tokenizer
        k = image_candidates

        def each(values: list) -> list:  # one entry per candidate image
            return [v for v in values for _ in range(k)]

        use_image_cfg = guidance.image_scale != 1.0 and any(r.has_context_image for r in rows)
        branches = [each([r.condition for r in rows])]
        if guidance.text_scale != 1.0 or use_image_cfg:
            null, text_only = self.branch_conds(
                [r.image_position for r in rows], [r.text_only_ids for r in rows] if use_image_cfg else None
            )
            branches += [each(null)] + ([each(text_only)] if use_image_cfg else [])
        generators = ([r.generator for r in rows] if k == 1
                      else [g for r in rows for g in self.candidate_generators(r.generator, k)])
        x = self.initial_noise(generators)
        velocity_fn = self.head_velocities(self.unified.reference_patches(each([r.reference for r in rows])),
                                           stack_with_zeros(each([r.plan for r in rows])))
        x = self.denoise(x, branches, guidance, num_inference_steps, callback_on_step_end, velocity_fn, generators)
        latents = tokenizer.unpatchify(x)
        if k > 1:
            latents = self.pick_candidates(rows, latents.unflatten(0, (len(rows), k)))
        pixels = tokenizer.postprocess(tokenizer.decode(latents)) if output_type != "latent" else [None] * len(rows)
        self.last_stats.images += len(rows)
        self.last_stats.image_seconds += time.perf_counter() - started
        for row, latent, pil in zip(rows, latents, pixels):
            row.latent, row.condition, row.plan = latent, None, None
            if self.unified.head_reference:
                row.reference = latent
            row.images += 1
            row.asking_from = len(row.text_only_ids)
            row.phase = FEEDBACK
            row.chunk = self._feedback_chunk(row, generated_compression)
            row.has_context_image = True
            yield StreamEvent(row=row.index, kind="image", image=Image(image=pil, latent=latent.cpu()))

    def candidate_generators(self, generator: torch.Generator | None, count: int) -> list[torch.Generator]:
        """`count` generators for the candidates of one image, seeded from the row's generator (or torch's
        global one), so that a seed gives the same candidates every time."""
        seeds = torch.randint(2**62, (count,), generator=generator, device=generator.device if generator else "cpu")
        return [torch.Generator(self.unified.device).manual_seed(int(seed)) for seed in seeds]

    def candidate_scores(self, rows: list[_Row], candidates: torch.Tensor) -> torch.Tensor:
        """Log-likelihood (R, K) of each row's text since its last image, read right after each of its
        candidate latents (R, K, C, H, W) as a context image: how well the model finds the text describes it."""
        model, codec = self.unified, self.codec
        none = model.image_modules.compressor.num_tokens("none")
        chunks, asked_ids = [], []
        for row, latents in zip(rows, candidates):
            asked = row.text_only_ids[row.asking_from:]
            asked = torch.tensor(asked[1:] if asked and asked[0] == codec.ids.bos else asked, device=model.device)
            for latent in latents:
                image = codec.encode([Image(latent=latent)], [none])
                embeds = model.embed(image.input_ids[None].to(model.device), [(0, span) for span in image.spans],
                                     image.latents)[0]
                chunks.append(Chunk(
                    embeds=torch.cat([embeds, model.text_embeddings(asked).to(embeds.dtype)]),
                    positions=torch.cat([image.position_ids.to(model.device),
                                         image.next_position + torch.arange(len(asked), device=model.device)]),
                    keep=torch.ones(len(image) + len(asked), dtype=torch.bool, device=model.device),
                ))
                asked_ids.append(asked)
        scores = []
        for hidden, asked in zip(fresh_forward(model, chunks), asked_ids):
            if not len(asked):
                scores.append(hidden.new_zeros((), dtype=torch.float32))
                continue
            logits = model.logits(hidden[len(hidden) - len(asked) - 1: -1])  # each predicts the next asked token
            scores.append(logits.log_softmax(-1).gather(-1, asked[:, None]).sum())
        return torch.stack(scores).view(len(rows), -1)

    def pick_candidates(self, rows: list[_Row], candidates: torch.Tensor) -> torch.Tensor:
        """The candidate latent (R, C, H, W) of each row with the highest `candidate_scores`. A unified model
        may read which colour sits on which shape better than its flow head draws it: on the default model,
        the text of a ShapesWorld picture is likelier after that picture than after one with the two colours
        swapped 99 times in 100, while the head draws the pair the right way round about half of the time."""
        best = self.candidate_scores(rows, candidates).argmax(-1)
        return candidates[torch.arange(len(rows), device=candidates.device), best]

    def _emit_text(self, rows: list[_Row]) -> Iterator[StreamEvent]:
        """Stream each row's new text. The run is decoded whole each time; a delta goes out only while the
        decoded run is clean UTF-8, so the deltas always add up to the decoded run."""
        for row in rows:
            if not row.text_run:
                continue
            run_over = row.phase in (IMAGE, DONE)
            text = self.codec.decode_text(row.text_run)
            if not run_over and "\ufffd" in text:
                continue  # undecodable bytes so far: only a clean prefix is sure to stay a prefix
            if len(text) > row.emitted_chars:
                yield StreamEvent(row=row.index, kind="text", text=text[row.emitted_chars:])
            row.emitted_chars = len(text)
            if run_over:
                row.text_run, row.emitted_chars = [], 0
