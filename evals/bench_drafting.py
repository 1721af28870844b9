"""Benchmark case "drafting": speculative text decoding against plain decoding (DESIGN.md §6, §9).

- Image-grounded prompts, in equal parts ShapesWorld captions, attribute/count/position QA, and story steps
  with the earlier pictures in the context, one at a time: text tokens/s (image time excluded: the pictures
  drawn, and the VAE encoding of the prompts' pictures, done once beforehand; also over decoding alone,
  the prompt's reading and its first token left out), τ (also per kind) and acceptance per drafter, and
  the lossless check (greedy output of every drafter token-identical to plain decoding). A "ceiling" row
  replays plain decoding's own output as the draft: its τ and speed bound what any drafter of the vision
  head's draft length can reach on these prompts. The same vision head also drafts in the other shape: a
  head that drafts chains gets a "vision-head (tree)" row (TREE_SIBLINGS alternatives at each depth), one
  whose config offers `siblings` a "vision-head (chain)" row, so the table shows whether a tree pays.
- Text-only prompts on the bare backbone: our drafters against transformers' own `generate()` plain,
  with `prompt_lookup_num_tokens` and with `assistant_model` (the same draft LM our `draft-lm` uses).
- Batch 4 with drafting against batch 4 without: identical outputs and the throughput ratio.

A trained vision head is the pipeline's `drafter` component; the ablation head without the image adaptor
and the draft LM sit beside it in the model folder (`mmgen train-drafter` writes all three). With
`--quick`, missing ones are stood in for by random ones, so the case runs end to end on any pipeline.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch

from mmgen.drafting import (
    DRAFT_LM_DIR,
    NO_ADAPTOR_DIR,
    Draft,
    Drafter,
    DraftLMDrafter,
    NgramDrafter,
    VisionDraftHead,
    VisionHeadDrafter,
)
from mmgen.segments import Image, Segment, Text
from mmgen.shapesworld import ShapesWorld
from mmgen.shapesworld.tasks import MAX_STEPS

from .bench import BenchOptions, CaseResult, bench_case, median_seconds

logger = logging.getLogger(__name__)

TREE_SIBLINGS = 2  # alternatives per depth of the tree a chain-drafting head is compared with
IMAGE_TOLERANCE = 1e-3  # on latents of unit scale: float noise passes, a different picture does not


GROUNDED_KINDS = ("caption", "qa", "story")
QA_CATEGORIES = ("color_qa", "shape_qa", "count_qa", "position_qa")


def grounded_prompts(count: int, seed: int, image_size: int) -> list[tuple[str, list[Segment]]]:
    """(kind, prompt) for image-grounded prompts in equal parts: captions of a picture, questions about it
    (colour, shape, count and position in turn), and stories continued after 1-2 given steps (text and
    picture each), so the next step's text is written with earlier pictures in view."""
    world = ShapesWorld(seed=seed, size=image_size)
    prompts = []
    for k in range(count):
        kind, turn = GROUNDED_KINDS[k % len(GROUNDED_KINDS)], k // len(GROUNDED_KINDS)
        if kind == "caption":
            prompt = list(world.sample(category="caption").prompt)
        elif kind == "qa":
            prompt = list(world.sample(category=QA_CATEGORIES[turn % len(QA_CATEGORIES)]).prompt)
        else:
            story = world.sample(task="story")
            given = min(len(story.answer) // 2 - 1, 1 + turn % 2)
            prompt = list(story.prompt) + list(story.answer[: 2 * given])
        prompts.append((kind, prompt))
    return prompts


def grounded_settings(quick: bool) -> dict:
    """Generation settings of the grounded prompts. A story may draw every picture it has left: a row out of
    pictures has `<|image_start|>` banned, and the text it writes in place of a picture is text that no story
    given enough pictures would contain, so drafting it measures nothing a user sees."""
    return dict(max_new_tokens=6 if quick else 64, num_inference_steps=1 if quick else 4, max_images=MAX_STEPS,
                temperature=0.0)


def text_prompts(count: int, seed: int) -> list[list[Segment]]:
    """Text-only prompts: stories to tell and scenes to describe."""
    world = ShapesWorld(seed=seed)
    return [[s for s in world.sample(task="story").prompt if isinstance(s, Text)] for _ in range(count)]


class CeilingDrafter(Drafter):
    """Drafts exactly what plain greedy decoding writes next, up to `max_draft` tokens: the τ and speed that
    no drafter of that draft length can beat on the same prompts, with drafting itself free.

    While `recording`, it drafts nothing and keeps each call's stream as the target's cache receives it;
    after `replay()`, call k replays the stream of prompt k (modulo their number), so prompts must come one
    at a time and in the same order.
    """

    name = "ceiling"

    def __init__(self, max_draft: int):
        self.max_draft = max_draft
        self.streams: list[list[int]] = []
        self.recording, self.calls = True, 0

    def replay(self) -> None:
        self.recording, self.calls = False, 0

    def start(self, batch_size: int, sampling) -> None:
        if batch_size != 1:
            raise ValueError("the ceiling drafter replays prompts one at a time")
        super().start(batch_size, sampling)
        self.seen: list[int] = []
        if not self.recording:
            self.stream = self.streams[self.calls % len(self.streams)]
            self.calls += 1

    def extend(self, row: int, update) -> None:
        self.seen += update.ids

    def propose(self, requests):
        if self.recording:
            return [Draft() for _ in requests]
        (request,) = requests
        start = len(self.seen) + 1  # the pending token takes the next place in the stream
        tokens = []
        for token in self.stream[start : start + min(self.max_draft, request.max_tokens)]:
            if token in self.sampling.stops:
                break
            tokens.append(token)
        return [Draft(tokens)]

    def finish(self) -> None:
        if self.recording:
            self.streams.append(self.seen)


def _fresh(prompt: list[Segment]) -> list[Segment]:
    """A copy whose images keep their pixels and latents (the pipeline fills latents in place)."""
    return [Image(image=s.image, latent=s.latent) if isinstance(s, Image) else s for s in prompt]


def _signature(segments: list[Segment]) -> tuple:
    """What must match for outputs to be identical: the text, and the images' latents."""
    return tuple(s.text if isinstance(s, Text) else s.latent for s in segments)


def _identical(a: tuple, b: tuple) -> bool:
    """The same text token for token, and the same pictures. A verifying pass lays the cache out differently
    from plain decoding, so the query states of a later picture can differ in the last bits of fp32; its
    latent must then agree to within that, not bit for bit."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                return False
        elif not torch.allclose(x, y, rtol=0, atol=IMAGE_TOLERANCE):
            return False
    return True


def _run(pipe, prompts, drafter, batch: int, settings: dict, kinds: list[str] | None = None) -> tuple[list[tuple], dict]:
    """Generate for every prompt (in batches), returning output signatures and summed statistics; with
    `kinds` (one per prompt, batch 1 only), also text tokens and passes per kind."""
    outputs = []
    totals = dict(tokens=0, passes=0, drafted=0, accepted=0, seconds=0.0, first_tokens=0, prefill_seconds=0.0,
                  by_kind={})
    for start in range(0, len(prompts), batch):
        group = [_fresh(p) for p in prompts[start : start + batch]]
        result = pipe(group, drafter=drafter, output_type="latent",
                      generator=[torch.Generator().manual_seed(start + k) for k in range(len(group))], **settings)
        outputs += [_signature(row) for row in result.segments]
        stats = pipe.last_stats
        totals["tokens"] += stats.text_tokens
        totals["passes"] += stats.text_forwards
        totals["drafted"] += stats.drafted_tokens
        totals["accepted"] += stats.accepted_tokens
        totals["seconds"] += stats.seconds - stats.image_seconds
        totals["first_tokens"] += stats.first_tokens
        totals["prefill_seconds"] += stats.prefill_seconds
        if kinds is not None and batch == 1:
            kind = totals["by_kind"].setdefault(kinds[start], [0, 0])
            kind[0] += stats.text_tokens
            kind[1] += stats.text_forwards
    return outputs, totals


def _measure(pipe, prompts, drafters: dict[str, Drafter | None], batch: int, settings: dict, repeats: int,
             kinds: list[str] | None = None) -> dict[str, tuple[list[tuple], dict]]:
    """Per drafter (None: plain decoding), the outputs of a first run and text tokens/s as the median over
    `repeats` timed runs after it: over all the text time, and over decoding alone (after the prompts were
    read, which drafting cannot speed up). Each round times every drafter once in turn, so a machine whose
    speed drifts during the bench slows them alike and the ratios between them hold."""
    measured = {name: _run(pipe, prompts, drafter, batch, settings, kinds) for name, drafter in drafters.items()}
    speeds = {name: [] for name in drafters}
    decode_speeds = {name: [] for name in drafters}
    for _ in range(repeats):
        for name, drafter in drafters.items():
            _, totals = _run(pipe, prompts, drafter, batch, settings)
            speeds[name].append(totals["tokens"] / max(totals["seconds"], 1e-9))
            decode_seconds = totals["seconds"] - totals["prefill_seconds"]
            decode_speeds[name].append((totals["tokens"] - totals["first_tokens"]) / max(decode_seconds, 1e-9))
    for name, (_, first) in measured.items():
        first["tokens_per_s"] = statistics.median(speeds[name])
        first["decode_tokens_per_s"] = statistics.median(decode_speeds[name])
        first["tau"] = first["tokens"] / max(first["passes"], 1)
        first["acceptance"] = first["accepted"] / max(first["drafted"], 1)
    return measured


def available_drafters(pipe, quick: bool) -> dict[str, Drafter]:
    """The drafters to compare; missing trained ones are random stand-ins with --quick, else left out."""
    folder = Path(getattr(pipe.config, "_name_or_path", "") or ".")
    model = pipe.unified
    drafters: dict[str, Drafter] = {"ngram": NgramDrafter()}
    hidden = pipe.backbone.get_input_embeddings().weight.shape[1]
    heads = {"vision-head": pipe.drafter if isinstance(pipe.drafter, VisionDraftHead) else None}
    no_adaptor = folder / NO_ADAPTOR_DIR
    heads["vision-head-no-adaptor"] = (
        VisionDraftHead.from_pretrained(str(no_adaptor), use_safetensors=True) if no_adaptor.is_dir() else None
    )
    for name, head in heads.items():
        if head is None and quick:
            torch.manual_seed(0)
            head = VisionDraftHead(hidden_size=hidden, num_heads=4, intermediate_size=2 * hidden,
                                   image_adaptor=name == "vision-head")
        if head is not None:
            drafters[name] = VisionHeadDrafter(head.to(model.device), model)
        else:
            logger.warning("no %s in %s: run `mmgen train-drafter` to include it", name, folder)
    head = drafters.get("vision-head")
    if head is not None:  # the same head drafting the other shape: whether a draft tree pays
        name, siblings = ("vision-head (chain)", 0) if head.siblings else ("vision-head (tree)", TREE_SIBLINGS)
        drafters[name] = VisionHeadDrafter(head.head, model, siblings=siblings)
    if (folder / DRAFT_LM_DIR).is_dir():
        drafters["draft-lm"] = DraftLMDrafter.from_folder(folder / DRAFT_LM_DIR, pipe.tokenizer)
    elif quick:
        drafters["draft-lm"] = DraftLMDrafter(_random_draft_lm(pipe))
    else:
        logger.warning("no draft LM in %s: run `mmgen train-drafter ... --kind draft-lm` to include it", folder)
    return drafters


def _random_draft_lm(pipe):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=pipe.backbone.get_output_embeddings().weight.shape[0], hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
        max_position_embeddings=pipe.context_length, eos_token_id=pipe.tokenizer.eos_token_id,
        pad_token_id=pipe.tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _hf_generate(pipe, prompt_ids: list[torch.Tensor], new_tokens: int, **kwargs) -> list[list[int]]:
    """transformers' `generate` on the bare backbone, banning the tokens our loop bans without images."""
    ids = pipe.codec.ids
    out = []
    for input_ids in prompt_ids:
        generated = pipe.backbone.generate(
            input_ids[None], attention_mask=torch.ones_like(input_ids)[None], max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=ids.eos, pad_token_id=ids.pad,
            suppress_tokens=[ids.image_start, ids.image_end, ids.image_pad, ids.pad], **kwargs,
        )[0, len(input_ids):].tolist()
        out.append(generated[: generated.index(ids.eos)] if ids.eos in generated else generated)
    return out


@bench_case("drafting")
@torch.no_grad()
def drafting_case(pipe, options: BenchOptions) -> CaseResult:
    quick = options.quick
    repeats = 1 if quick else options.repeats
    image_size = pipe.model.config.image_size
    kinds, grounded = map(list, zip(*grounded_prompts(6 if quick else 60, options.seed, image_size)))
    for prompt in grounded:  # the VAE reads each prompt's pictures once: image time, not text time
        pipe.encode_images(prompt)
    settings = grounded_settings(quick)
    drafters = available_drafters(pipe, quick)
    rows, ratios = [], {}

    # 1. Image-grounded prompts, one at a time, fp32 greedy: speed, τ, acceptance, losslessness. The ceiling
    # replays plain decoding's output at the vision head's draft length: what a perfect drafter that costs
    # nothing would reach. It records that output in a run of its own before the measured runs.
    max_draft = drafters["vision-head"].max_draft if "vision-head" in drafters else 8
    ceiling = CeilingDrafter(max_draft)
    _run(pipe, grounded, ceiling, 1, settings)
    ceiling.replay()
    ceiling_name = f"ceiling (plain output replayed, {max_draft} ahead)"
    measured = _measure(pipe, grounded, {"plain": None, **drafters, ceiling_name: ceiling}, 1, settings, repeats,
                        kinds)
    plain_out, plain = measured.pop("plain")
    rows.append(_row("grounded", "plain", plain, plain, 1.0))
    for name, (outputs, result) in measured.items():
        same = sum(_identical(a, b) for a, b in zip(outputs, plain_out)) / len(grounded)
        rows.append(_row("grounded", name, result, plain, same))
    results = {name: result for name, (_, result) in measured.items() if name != ceiling_name}
    if "vision-head" in results:
        head = results["vision-head"]
        ratios["vision_head_tau"] = head["tau"]
        ratios["vision_head_speedup"] = head["tokens_per_s"] / plain["tokens_per_s"]
        ratios["vision_head_decode_speedup"] = head["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
        if "vision-head-no-adaptor" in results:
            ratios["vision_head_tau_vs_no_adaptor"] = head["tau"] / results["vision-head-no-adaptor"]["tau"]

    # 2. Text-only prompts on the bare backbone: ours against transformers' generate().
    texts = text_prompts(2 if quick else 20, options.seed + 1)
    new_tokens = 6 if quick else 64
    text_settings = dict(max_new_tokens=new_tokens, num_inference_steps=1, max_images=0, temperature=0.0)
    prompt_ids = [pipe.codec.encode(p, []).input_ids for p in texts]
    hf_plain = _hf_generate(pipe, prompt_ids, new_tokens)
    count = sum(len(t) for t in hf_plain)
    ours_plain_out, _ = _run(pipe, texts, None, 1, text_settings)
    agree = sum(pipe.codec.decode_text(t) == "".join(out) for t, out in zip(hf_plain, ours_plain_out)) / len(texts)
    speeds = {"hf plain": count / median_seconds(lambda: _hf_generate(pipe, prompt_ids, new_tokens), repeats)}
    speeds["hf prompt lookup"] = count / median_seconds(
        lambda: _hf_generate(pipe, prompt_ids, new_tokens, prompt_lookup_num_tokens=10), repeats)
    if "draft-lm" in drafters:
        assistant = drafters["draft-lm"].model
        speeds["hf assisted"] = count / median_seconds(
            lambda: _hf_generate(pipe, prompt_ids, new_tokens, assistant_model=assistant), repeats)
    ours = {}
    for name, drafter in [("plain", None), *drafters.items()]:
        _, totals = _run(pipe, texts, drafter, 1, text_settings)
        seconds = median_seconds(lambda d=drafter: _run(pipe, texts, d, 1, text_settings), repeats)
        ours[name] = totals["tokens"] / seconds
    for name, speed in speeds.items():
        rows.append({"workload": "text-only", "drafter": name, "tokens_per_s": speed,
                     "matches_ours": agree if name == "hf plain" else ""})
    for name, speed in ours.items():
        rows.append({"workload": "text-only", "drafter": f"ours {name}", "tokens_per_s": speed})
    best = max(speed for name, speed in ours.items() if name != "plain") if len(ours) > 1 else ours["plain"]
    if "hf assisted" in speeds:
        ratios["best_vs_hf_assisted"] = best / speeds["hf assisted"]
    ratios["best_vs_hf_prompt_lookup"] = best / speeds["hf prompt lookup"]

    # 3. Batch 4 with the best grounded drafter against batch 4 without.
    chosen = "vision-head" if "vision-head" in drafters else max(results, key=lambda n: results[n]["tau"])
    batch_prompts = grounded[: 4 if quick else 32]
    batch4 = _measure(pipe, batch_prompts, {"plain": None, chosen: drafters[chosen]}, 4, settings, repeats)
    (plain4_out, plain4), (draft4_out, draft4) = batch4["plain"], batch4[chosen]
    same = sum(_identical(a, b) for a, b in zip(draft4_out, plain4_out)) / len(batch_prompts)
    same_as_one = sum(_identical(a, b) for a, b in zip(draft4_out, plain_out)) / len(batch_prompts)
    rows.append(_row("batch 4", "plain", plain4, plain4, 1.0))
    rows.append({**_row("batch 4", chosen, draft4, plain4, same), "identical_to_batch_1": same_as_one})
    ratios["batch4_drafting_vs_plain"] = draft4["tokens_per_s"] / plain4["tokens_per_s"]
    return CaseResult(case="drafting", rows=rows, ratios=ratios)


def _row(workload: str, name: str, result: dict, plain: dict, identical: float) -> dict:
    """A table row; grounded rows also give τ per kind of prompt (`tau_caption`, `tau_qa`, `tau_story`)."""
    return {
        "workload": workload,
        "drafter": name,
        "tokens_per_s": result["tokens_per_s"],
        "speedup": result["tokens_per_s"] / plain["tokens_per_s"],
        "decode_speedup": result["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
        "tau": result["tau"],
        **{f"tau_{kind}": tokens / max(passes, 1) for kind, (tokens, passes) in result["by_kind"].items()},
        "acceptance": result["acceptance"] if result["drafted"] else "",
        "identical_to_plain": identical,
    }

