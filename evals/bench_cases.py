"""Benchmark cases of the generation loop: story end to end, seconds per image vs context, batching, precision.

Baselines run in the same process on the same model:
- the re-forward loop (Show-o2 style) keeps no cache: every text token and every flow step re-runs the
  backbone over the whole history, the noisy image's tokens included;
- the in-backbone loop (BAGEL/Transfusion style) caches the context but runs the backbone over the
  noisy image tokens at every flow step, in every guidance branch, and reads the velocity off their last
  states through one linear layer, as BAGEL's `llm2vae` and Transfusion's linear output do. Its
  unconditional text branch drops only the latest text and keeps the history before it, as BAGEL's
  interleaved inference keeps its `cfg_text` context.
Both replay exactly the segments our pipeline produced, so each side does the same amount of work.
"""

from __future__ import annotations

import copy
import statistics

import torch

from mmgen.pipelines.decoding import BatchCache, Chunk
from mmgen.pipelines.pipeline_mmgen import (
    CFG_INTERVAL,
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    Guidance,
)
from mmgen.segments import Image, Segment, Text
from mmgen.shapesworld import ShapesWorld
from mmgen.stream import EncodedSequence

from .bench import BenchOptions, CaseResult, bench_case, median_seconds


def _settings(options: BenchOptions) -> dict:
    """The pipeline's default generation settings (fewer flow steps in a quick run)."""
    return dict(num_inference_steps=4 if options.quick else NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                image_guidance_scale=IMAGE_GUIDANCE_SCALE, cfg_interval=CFG_INTERVAL)


def _encode_prompt(pipe, segments: list[Segment]) -> tuple[Chunk, EncodedSequence]:
    """Segments (images at full resolution, no queries) as one chunk the cache keeps, and their encoding."""
    model, codec = pipe.unified, pipe.codec
    segments = pipe.encode_images([s if isinstance(s, Text) else Image(image=s.image, latent=s.latent)
                                   for s in segments])
    count = model.image_modules.compressor.num_tokens("none")
    encoded = codec.encode(segments, [count] * sum(isinstance(s, Image) for s in segments))
    embeds = model.embed(encoded.input_ids[None], [(0, span) for span in encoded.spans], encoded.latents)[0]
    positions = encoded.position_ids
    return Chunk(embeds, positions, torch.ones(len(positions), dtype=torch.bool)), encoded


def _drawing_chunk(pipe, position: int, noisy: torch.Tensor | None = None, queries: bool = True) -> Chunk:
    """<|image_start|> (+ the noisy image's tokens, for loops that run the backbone at every flow step)
    (+ the queries) at one position."""
    model = pipe.unified
    start = model.text_embeddings(torch.tensor([pipe.codec.ids.image_start]))
    parts = [start]
    if noisy is not None:
        parts.append(model.image_modules.embed_image_tokens(noisy[None])[0])
    if queries:
        parts.append(model.query_embeddings(1)[0])
    embeds = torch.cat(parts)
    positions = torch.tensor([position] + [position + 1] * (len(embeds) - 1))
    return Chunk(embeds=embeds, positions=positions, keep=torch.zeros(len(embeds), dtype=torch.bool))


def _velocity_in_backbone(pipe, contexts: list[Chunk | None], positions: list[int]):
    """A velocity function that runs the backbone over the noisy image at every step, branch k attending to
    context k (None: the empty unconditional context), and reads each image token's velocity off its last
    state through one linear layer. The layer is untrained (the default model has none): this loop is
    timed, not judged."""
    model = pipe.unified
    hidden_size = model.image_modules.config.backbone_hidden_size
    dtype = model.image_modules.queries.dtype
    readout = torch.nn.Linear(hidden_size, model.image_modules.config.token_dim, dtype=dtype, device=model.device)

    def velocity(x, t, branches):
        outs = []
        for k in range(len(branches)):
            chunk = _drawing_chunk(pipe, positions[k], x[0], queries=False)
            cache = BatchCache(model, 1) if contexts[k] is None else contexts[k]
            hidden = cache.forward([chunk])[0]
            outs.append(readout(hidden[1:])[None])
        return outs

    return velocity


def _story_prompt(seed: int) -> list[Segment]:
    sample = ShapesWorld(seed=seed).sample(task="story", category="given")
    return list(sample.prompt)


@bench_case("story")
def story_case(pipe, options: BenchOptions) -> CaseResult:
    """A story end to end with our KV-cached loop vs a loop that re-forwards the whole history each step."""
    settings = _settings(options)
    prompt = _story_prompt(options.seed + 1)
    max_new = 40 if options.quick else 200

    def ours():
        return pipe(prompt, max_new_tokens=max_new, max_images=4, generator=torch.Generator().manual_seed(0),
                    **settings)

    produced = ours().segments[0]
    n_images = sum(isinstance(s, Image) for s in produced)
    n_tokens = sum(len(pipe.codec.text_ids(s.text)) for s in produced if isinstance(s, Text))

    def reforward():
        model = pipe.unified
        history: list[Segment] = list(prompt)
        guidance = Guidance(settings["guidance_scale"], settings["image_guidance_scale"], settings["cfg_interval"])
        for segment in produced:
            if isinstance(segment, Text):
                ids = pipe.codec.text_ids(segment.text)
                for k in range(len(ids)):
                    chunk, _ = _encode_prompt(pipe, [*history, Text(pipe.codec.decode_text(ids[:k + 1]))])
                    hidden, _ = model.run_backbone(chunk.embeds[None], chunk.positions[None])
                    model.logits(hidden[:, -1])
                history.append(segment)
                continue
            chunk, encoded = _encode_prompt(pipe, history)
            text_chunk, _ = _encode_prompt(pipe, [s for s in history if isinstance(s, Text)])
            contexts = [chunk, None, text_chunk]
            starts = [encoded.next_position, encoded.next_position, len(text_chunk.positions)]

            def velocity(x, t, branches, contexts=contexts, starts=starts):
                outs = []
                for k in range(len(branches)):
                    fresh = BatchCache(model, 1)
                    if contexts[k] is not None:
                        fresh.forward([contexts[k]])  # no cache across steps: the whole history again
                    hidden = fresh.forward([_drawing_chunk(pipe, starts[k], x[0])])[0]
                    outs.append(model.velocity(x, t, hidden[-model.num_queries:][None]))
                return outs

            branches = [None, None, None] if any(isinstance(s, Image) for s in history) else [None, None]
            x = pipe.initial_noise([torch.Generator().manual_seed(0)])
            x = pipe.denoise(x, branches, guidance, settings["num_inference_steps"], velocity_fn=velocity)
            model.image_tokenizer.decode(model.image_tokenizer.unpatchify(x))
            history.append(Image(latent=segment.latent))

    t_ours = median_seconds(ours, options.repeats)
    t_reforward = median_seconds(reforward, max(1, options.repeats // 2))
    rows = [
        {"loop": "ours (one KV cache, flow head)", "seconds": t_ours, "text_tokens": n_tokens, "images": n_images},
        {"loop": "re-forward history each step", "seconds": t_reforward, "text_tokens": n_tokens,
         "images": n_images},
    ]
    return CaseResult("story", rows, {"story_vs_reforward": t_reforward / t_ours})


def _context(pipe, n_images: int, seed: int) -> list[Segment]:
    world = ShapesWorld(seed=seed)
    segments: list[Segment] = []
    for _ in range(n_images):
        sample = world.sample(task="t2i")
        segments += [sample.prompt[0], sample.answer[0]]
    segments.append(Text(" draw a red circle left of a blue square."))
    return segments


@bench_case("image")
def image_case(pipe, options: BenchOptions) -> CaseResult:
    """Seconds per image with an empty context vs a 16-image one: our head vs an in-backbone loop.

    The ratios compare like with like: text guidance only (a full and an unconditional branch) at both
    context sizes, so they measure what the context costs. Image guidance adds a third branch that exists
    only when there are context images; its row is reported on its own. The in-backbone loop's
    unconditional branch attends to the history without the drawing instruction.
    """
    settings = _settings(options)
    text_guidance = Guidance(settings["guidance_scale"], 1.0, settings["cfg_interval"])
    full_guidance = Guidance(settings["guidance_scale"], settings["image_guidance_scale"], settings["cfg_interval"])
    model = pipe.unified
    q = model.num_queries
    rows, seconds = [], {}
    for n_context in (0, 16):
        segments = _context(pipe, n_context, options.seed)
        prompt_chunk, encoded = _encode_prompt(pipe, segments)
        text_only = [s for s in segments if isinstance(s, Text)]
        start = encoded.next_position
        main_cache = BatchCache(model, 1)
        prompt_states = main_cache.forward([prompt_chunk])[0]
        history_cache, history_start = None, start
        if n_context:
            history_chunk, history_encoded = _encode_prompt(pipe, segments[:-1])
            history_cache, history_start = BatchCache(model, 1), history_encoded.next_position
            history_cache.forward([history_chunk])
        since_image = encoded.spans[-1].end + 1 if encoded.spans else 0
        last_image = prompt_states[encoded.spans[-1].vision_slice] if encoded.spans else None
        reference = model.reference_patches([encoded.latents[-1] if encoded.latents else None])

        def ours(guidance, cache=main_cache, start=start, text_only=text_only, text=prompt_states[since_image:],
                 image=last_image, reference=reference):
            states = cache.forward([_drawing_chunk(pipe, start)])[0]
            cond = [model.head_condition(states[-q:], torch.cat([text, states[:1]]), image)]
            use_image_cfg = guidance.image_scale != 1.0
            text_ids = [int(t) for t in pipe.codec.encode(text_only, []).input_ids]
            null, text_branch = pipe.branch_conds([start], [text_ids] if use_image_cfg else None)
            branches = [cond, null] + ([text_branch] if use_image_cfg else [])
            x = pipe.initial_noise([torch.Generator().manual_seed(0)])
            x = pipe.denoise(x, branches, guidance, settings["num_inference_steps"],
                             velocity_fn=pipe.head_velocities(reference))
            model.image_tokenizer.decode(model.image_tokenizer.unpatchify(x))

        def in_backbone(cache=main_cache, start=start, history=history_cache, history_start=history_start):
            velocity = _velocity_in_backbone(pipe, [cache, history], [start, history_start])
            x = pipe.initial_noise([torch.Generator().manual_seed(0)])
            x = pipe.denoise(x, [None, None], text_guidance, settings["num_inference_steps"],
                             velocity_fn=velocity)
            model.image_tokenizer.decode(model.image_tokenizer.unpatchify(x))

        runs = [("ours (flow head beside the backbone)", "text", lambda: ours(text_guidance)),
                ("in-backbone loop", "text", in_backbone)]
        if n_context:
            runs.append(("ours (flow head beside the backbone)", "text + image", lambda: ours(full_guidance)))
        for name, branches, fn in runs:
            t = median_seconds(fn, options.repeats)
            seconds[(name, branches, n_context)] = t
            rows.append({"loop": name, "guidance": branches, "context_images": n_context,
                         "context_tokens": len(prompt_chunk.positions), "seconds_per_image": t})
    ours_name, inb_name = "ours (flow head beside the backbone)", "in-backbone loop"
    ratios = {
        "image_ctx16_vs_ctx0_ours": seconds[(ours_name, "text", 16)] / seconds[(ours_name, "text", 0)],
        "image_ctx16_vs_ctx0_in_backbone": seconds[(inb_name, "text", 16)] / seconds[(inb_name, "text", 0)],
    }
    return CaseResult("image", rows, ratios)


@bench_case("batch")
def batch_case(pipe, options: BenchOptions) -> CaseResult:
    """Throughput of 8 prompts in one batch vs the same prompts one at a time.

    Two workloads: a mixed one (4 text→image and 4 image→text prompts), and a text-only one (8 image→text
    prompts) that shows what batching gives text decoding alone. Drawing is compute-bound on a CPU, so the
    mixed ratio is bounded by the flow head's cost per image, which batching barely changes.
    """
    settings = _settings(options)
    world = ShapesWorld(seed=options.seed + 2)
    kwargs = dict(max_new_tokens=8 if options.quick else 24, max_images=1, **settings)
    workloads = {
        "mixed": [list(world.sample(task=task).prompt) for task in ["t2i", "i2t"] * 4],
        "text": [list(world.sample(task="i2t").prompt) for _ in range(8)],
    }
    rows, ratios = [], {}
    for name, prompts in workloads.items():
        def batched(prompts=prompts):
            return pipe(prompts, generator=[torch.Generator().manual_seed(k) for k in range(8)], **kwargs)

        def one_at_a_time(prompts=prompts):
            return [pipe([p], generator=[torch.Generator().manual_seed(k)], **kwargs) for k, p in enumerate(prompts)]

        t_batch = median_seconds(batched, options.repeats)
        t_single = median_seconds(one_at_a_time, options.repeats)
        rows += [{"workload": name, "mode": "batch of 8", "seconds": t_batch, "prompts_per_s": 8 / t_batch},
                 {"workload": name, "mode": "8 x batch of 1", "seconds": t_single, "prompts_per_s": 8 / t_single}]
        key = "batch8_vs_batch1_throughput" if name == "mixed" else "batch8_vs_batch1_text_throughput"
        ratios[key] = t_single / t_batch
    return CaseResult("batch", rows, ratios)


@bench_case("precision")
def precision_case(pipe, options: BenchOptions) -> CaseResult:
    """The same workloads with the pipeline in float32 and in bfloat16, in one run: 8 text→image prompts in
    one batch and one at a time (images/s), 8 image→text prompts one at a time (text tokens/s, image time
    excluded), and a training step (forward and backward of a batch of the default recipe) on float32
    weights, plain and under bf16 autocast as `mixed_precision: bf16` runs it. bfloat16 pays where the CPU
    multiplies bf16 matrices natively (AVX-512 BF16, AMX)."""
    settings = _settings(options)
    world = ShapesWorld(seed=options.seed + 3)
    drawing = [list(world.sample(task="t2i").prompt) for _ in range(8)]
    reading = [list(world.sample(task="i2t").prompt) for _ in range(8)]
    kwargs = dict(max_new_tokens=8 if options.quick else 24, max_images=1, **settings)
    seeds = range(len(drawing))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = pipe if pipe.dtype == dtype else copy.deepcopy(pipe).to(dtype)

        def batched(model=model):
            return model(drawing, generator=[torch.Generator().manual_seed(k) for k in seeds], **kwargs)

        def one_at_a_time(model=model, prompts=drawing):
            return [model([p], generator=[torch.Generator().manual_seed(k)], **kwargs) for k, p in enumerate(prompts)]

        def text_tokens_per_s(model=model) -> float:
            tokens = seconds = 0.0
            for k, prompt in enumerate(reading):
                model([prompt], generator=[torch.Generator().manual_seed(k)], **kwargs)
                tokens += model.last_stats.text_tokens
                seconds += model.last_stats.seconds - model.last_stats.image_seconds
            return tokens / seconds

        rows.append({
            "dtype": str(dtype).removeprefix("torch."),
            "images_per_s_batch8": len(drawing) / median_seconds(batched, options.repeats),
            "images_per_s_batch1": len(drawing) / median_seconds(one_at_a_time, options.repeats),
            "text_tokens_per_s": statistics.median(text_tokens_per_s() for _ in range(options.repeats)),
        })
    # Training: forward and backward of one ShapesWorld batch on float32 weights, plain and under bf16 autocast.
    trainee = pipe if pipe.dtype == torch.float32 else copy.deepcopy(pipe).to(torch.float32)
    batch = _training_batch(trainee, batch_size=4 if options.quick else 24, seed=options.seed)
    for row in rows:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=row["dtype"] == "bfloat16")
        row["train_steps_per_s"] = 1 / median_seconds(
            lambda autocast=autocast: _train_step(trainee.unified, batch, autocast), options.repeats)
    fp32, bf16 = rows
    ratios = {
        "bf16_vs_fp32_images_batch8": bf16["images_per_s_batch8"] / fp32["images_per_s_batch8"],
        "bf16_vs_fp32_images_batch1": bf16["images_per_s_batch1"] / fp32["images_per_s_batch1"],
        "bf16_vs_fp32_text_tokens": bf16["text_tokens_per_s"] / fp32["text_tokens_per_s"],
        "bf16_autocast_vs_fp32_train_step": bf16["train_steps_per_s"] / fp32["train_steps_per_s"],
    }
    return CaseResult("precision", rows, ratios)


def _training_batch(pipe, batch_size: int, seed: int):
    """A packed ShapesWorld batch of the trainer's default task mix, as the trainer builds it."""
    from mmgen.config import TrainArguments
    from mmgen.data import BatchBuilder, ShapesWorldData

    model = pipe.unified
    args = TrainArguments(output_dir="unused", batch_size=batch_size, seed=seed)
    builder = BatchBuilder(pipe.codec, model.image_tokenizer, model.image_modules.compressor, args)
    return ShapesWorldData(builder, args, image_size=model.image_tokenizer.image_size).batch(0)


def _train_step(model, batch, autocast) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad(), autocast:
        loss = model(batch, flow_repeats=2).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
