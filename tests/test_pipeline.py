"""MMGenPipeline: the interleaved loop on several backbones, save/load, batching, and argument checks."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmgen import Image, Text
from mmgen.pipelines import InterleavedPipelineOutput, MMGenPipeline

from .conftest import BACKBONE_TYPES


def kinds(segments) -> str:
    return "".join("I" if isinstance(s, Image) else "T" for s in segments)


@pytest.mark.parametrize("backbone", BACKBONE_TYPES)
def test_full_loop_text_image_text_image_runs_on_each_backbone(make_pipeline, backbone):
    pipe = make_pipeline(backbone, image_scale=5.0)
    out = pipe("draw a red circle.", max_new_tokens=24, num_inference_steps=2, max_images=2)
    assert isinstance(out, InterleavedPipelineOutput)
    pattern = kinds(out.segments[0])
    assert "ITI" in pattern, f"expected text between two images, got {pattern}"
    images = out.images[0]
    assert len(images) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in images)
    assert out.text[0] == "".join(s.text for s in out.segments[0] if isinstance(s, Text))
    assert pipe.last_stats.images == 2


def test_save_and_load_round_trip_gives_identical_output(make_pipeline, tmp_path):
    pipe = make_pipeline("llama", image_scale=6.0)
    first = pipe("a story.", max_new_tokens=16, num_inference_steps=3, generator=torch.Generator().manual_seed(7))
    pipe.save_pretrained(tmp_path)
    loaded = MMGenPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    second = loaded("a story.", max_new_tokens=16, num_inference_steps=3, generator=torch.Generator().manual_seed(7))
    assert first.text == second.text
    assert kinds(first.segments[0]) == kinds(second.segments[0])
    for a, b in zip(first.images[0], second.images[0]):
        assert a.tobytes() == b.tobytes()
    assert not list(tmp_path.rglob("*.bin")), "components are saved as safetensors"


@pytest.mark.parametrize("head_text_tokens,head_image_tokens,head_reference",
                         [(0, 0, False), (5, 0, False), (5, 4, True)])
def test_batch_gives_the_same_rows_as_one_at_a_time(make_pipeline, head_text_tokens, head_image_tokens,
                                                     head_reference):
    """With a head that reads text states or the last context image, rows bring conditions of different
    lengths, and with a reference input some rows have a reference latent and some none: neither padding nor
    the missing references may change any row's picture."""
    pipe = make_pipeline("qwen2", image_scale=6.0, head_text_tokens=head_text_tokens,
                         head_image_tokens=head_image_tokens, head_reference=head_reference)
    picture = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    prompts = [["draw a red circle."], [picture, " what colour is it?"], ["tell a story about a square."]]
    kwargs = dict(max_new_tokens=12, num_inference_steps=2, max_images=2)
    seeds = [11, 12, 13]
    drawn_together = []
    denoise = pipe.denoise
    pipe.denoise = lambda x, *args, **kw: drawn_together.append(x.shape[0]) or denoise(x, *args, **kw)
    batched = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    del pipe.denoise
    # Rows reach their images at different steps, yet each round of drawing serves every row still going:
    # a row's k-th image is drawn in the k-th batched call.
    counts = [len(images) for images in batched.images]
    assert sum(drawn_together) == sum(counts) and len(drawn_together) == max(counts)
    for k, prompt in enumerate(prompts):
        single = pipe([prompt], generator=[torch.Generator().manual_seed(seeds[k])], **kwargs)
        assert batched.text[k] == single.text[0]
        assert kinds(batched.segments[k]) == kinds(single.segments[0])
        for a, b in zip(batched.images[k], single.images[0]):
            diff = (torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).abs().max()
            assert diff <= 1, "the same noise and conditions give the same picture"


@pytest.mark.parametrize("head_image_tokens,head_reference", [(0, False), (4, True), (16, False)])
def test_the_flow_head_gets_the_conditions_training_builds(make_pipeline, head_image_tokens, head_reference):
    """For each guidance branch, the condition the pipeline gives the flow head (query states, the newest
    text states since the last context image, and that image's states pooled to `head_image_tokens`) is the one
    teacher-forced training builds for the same sequence: the full one, the text-dropout one, and the one
    with the context image dropped. So is the reference latent of a head with a reference input: that image's
    latent in the full branch, none in the others. A second picture reads the first one, fed back into the
    context."""
    from mmgen.data import drop_image_context
    from mmgen.stream import pack_sequences

    cap = 8
    pipe = make_pipeline("llama", image_scale=50.0, head_text_tokens=cap,  # draws at once after the prompt
                         head_image_tokens=head_image_tokens, head_reference=head_reference)
    picture = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    prompt = pipe.encode_images([Text("a red circle and a green star."), Image(image=picture), Text(" now blue:")])
    model, codec = pipe.unified, pipe.codec
    seen, references = [], []
    denoise, velocity = pipe.denoise, model.velocity
    pipe.denoise = lambda x, branches, *args, **kw: seen.append(branches) or denoise(x, branches, *args, **kw)
    model.velocity = lambda *args: references.append((len(seen) - 1, args[4])) or velocity(*args)
    out = pipe([prompt], max_new_tokens=4, num_inference_steps=2, max_images=2, guidance_scale=3.0,
               image_guidance_scale=2.0, output_type="latent")
    del pipe.denoise, model.velocity
    answer = out.segments[0]
    assert isinstance(answer[0], Image), "the prompt should lead straight to a picture"
    second = [k for k, s in enumerate(answer) if isinstance(s, Image)][1]
    q = model.num_queries

    def teacher_forced(prompt_part, answer_part, drop_text=False):
        """The condition and the reference latent training builds for the last image of prompt_part +
        answer_part."""
        segments = [*prompt_part, *(Image(latent=s.latent) if isinstance(s, Image) else s for s in answer_part)]
        count = model.image_modules.compressor.num_tokens("none")
        enc = codec.encode(segments, [count] * sum(isinstance(s, Image) for s in segments),
                           answer_start=len(prompt_part))
        enc.spans[-1].drop_text = drop_text
        packed = pack_sequences([enc], max_length=256, pad_id=codec.ids.pad)
        with torch.no_grad():
            hidden, _ = model.run_backbone(model.embed(packed.input_ids, packed.spans, packed.latents),
                                           packed.position_ids, packed.attention_mask)
        row, span = packed.spans[-1]
        return model.training_head_inputs(hidden, packed, row, span)

    def trained_condition(prompt_part, answer_part, drop_text=False):
        return teacher_forced(prompt_part, answer_part, drop_text)[0]

    full, null, text_only = (branch[0] for branch in seen[0])
    after_image = len(codec.text_ids(" now blue:")) + 1  # and <|image_start|>
    image_tokens = min(head_image_tokens, model.image_modules.compressor.num_tokens("none"))
    assert after_image < cap and full.shape[0] == q + after_image + image_tokens, "the text since the image"
    assert text_only.shape[0] == q + cap, "with the image dropped, all text: the newest `cap` states"
    assert null.shape[0] == q + 1, "the null branch reads its <|image_start|> alone"
    first = answer[:1]
    torch.testing.assert_close(full, trained_condition(prompt, first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(null, trained_condition(prompt, first, drop_text=True), atol=1e-5, rtol=1e-5)
    without_images, _ = drop_image_context(prompt, first)
    torch.testing.assert_close(text_only, trained_condition(without_images, first), atol=1e-5, rtol=1e-5)
    then = seen[1][0][0]
    assert second == 1, "the first picture should lead straight to the second"
    assert then.shape[0] == q + 1 + image_tokens, "the second picture reads the first, not the prompt's"
    torch.testing.assert_close(then, trained_condition(prompt, answer[: second + 1]), atol=1e-5, rtol=1e-5)

    patches = model.image_tokenizer.patchify
    if not head_reference:
        assert all(reference is None for _, reference in references)
        return
    without_text = teacher_forced(prompt, first, drop_text=True)[1]
    assert without_text is None and teacher_forced(without_images, first)[1] is None, "no image, no reference"
    for image, latent in ((0, prompt[1].latent), (1, answer[0].latent)):
        given = [reference for drawn, reference in references if drawn == image]
        assert given and all(reference.shape[0] == 3 for reference in given), "one per guidance branch"
        trained = teacher_forced(prompt, answer[: 1 + image * second])[1]
        torch.testing.assert_close(trained, latent)
        for reference in given:
            torch.testing.assert_close(reference[0], patches(latent[None])[0], atol=1e-6, rtol=0)
            assert not reference[1:].any(), "the guidance branches see no reference"


def test_the_flow_head_gets_the_plan_map_training_builds(make_pipeline):
    """A head with a plan input gets, in the full branch, the plan map teacher-forced training builds for the same
    text: each entry's states around its cell. The guidance branches get none, nor does a picture whose text
    holds no plan, and an entry that begins before the text the head reads does not count."""
    from mmgen.stream import pack_sequences

    cap = 12
    pipe = make_pipeline("llama", image_scale=50.0, head_text_tokens=cap, head_plan=True)  # draws at once
    model, codec = pipe.unified, pipe.codec
    prompt = [Text("draw them. red circle b2, blue square g7.")]
    given = []
    velocity = model.velocity
    model.velocity = lambda *args: given.append(args[5]) or velocity(*args)
    out = pipe(prompt, max_new_tokens=4, num_inference_steps=2, max_images=2, guidance_scale=3.0,
               output_type="latent")
    del model.velocity
    answer = out.segments[0]
    assert [isinstance(s, Image) for s in answer[:2]] == [True, True], "the prompt should lead straight to two pictures"
    first = [plan for plan in given if plan is not None]
    assert len(first) == 2 and all(plan.shape[0] == 2 for plan in first), "the first picture, one step each"
    assert all(plan is None for plan in given[2:]), "the second picture's text holds no plan"

    enc = codec.encode([*prompt, Image(latent=answer[0].latent)], [model.image_modules.compressor.num_tokens("none")],
                       answer_start=1)
    packed = pack_sequences([enc], max_length=256, pad_id=codec.ids.pad)
    with torch.no_grad():
        hidden, _ = model.run_backbone(model.embed(packed.input_ids, packed.spans, packed.latents),
                                       packed.position_ids, packed.attention_mask)
    trained = model.training_head_inputs(hidden, packed, *packed.spans[0])[2]
    for plan in first:
        torch.testing.assert_close(plan[0], trained, atol=1e-5, rtol=1e-5)
        assert not plan[1].any(), "the null branch gets no plan"
    strength = trained.norm(dim=-1).reshape(4, 4)  # the tiny head's 4 x 4 grid: b2 is at its top left, g7 bottom right
    assert strength[0, 0] > strength[0, 1:].max() and strength[3, 3] > strength[3, :3].max()
    assert strength[:2, 2:].max() < 0.5 * strength[0, 0], "nothing lands far from both cells"
    text, entries = hidden[0, : packed.spans[0][1].start + 1], packed.spans[0][1].plan
    assert len(entries) == 2 and model.plan_map(text, []) is None
    narrow = make_pipeline("llama", head_text_tokens=6, head_plan=True).unified  # " blue square g7." and the start
    torch.testing.assert_close(narrow.plan_map(text, entries), narrow.plan_map(text, entries[1:]))
    with pytest.raises(ValueError, match="head_plan needs head_text_tokens"):
        make_pipeline("llama", head_plan=True)


def test_streaming_yields_segments_in_order(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    events = list(pipe.stream("draw.", max_new_tokens=24, num_inference_steps=2, max_images=2,
                              generator=torch.Generator().manual_seed(3)))
    assert events[-1].kind == "done"
    produced = [e.kind for e in events if e.kind != "done"]
    assert "image" in produced and "text" in produced
    out = pipe("draw.", max_new_tokens=24, num_inference_steps=2, max_images=2, generator=torch.Generator().manual_seed(3))
    assert "".join(e.text for e in events if e.kind == "text") == out.text[0]


def test_max_images_and_max_new_tokens_are_limits(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    out = pipe("draw.", max_new_tokens=10, num_inference_steps=1, max_images=0)
    assert out.images[0] == [] and pipe.last_stats.text_tokens <= 10


def test_generation_runs_in_eval_mode_even_after_part_of_the_model_was_put_in_training(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    greedy = dict(max_new_tokens=12, num_inference_steps=1, max_images=1, output_type="latent")
    before = pipe("draw.", generator=torch.Generator().manual_seed(0), **greedy)
    attention = pipe.backbone.model.layers[0].self_attn
    attention.train()  # as a fine-tuning loop may leave it; its dropout would then change the outputs
    attention.attention_dropout = 0.5
    after = pipe("draw.", generator=torch.Generator().manual_seed(0), **greedy)
    assert not any(m.training for m in pipe.unified.modules())
    assert after.text == before.text


def test_output_types(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    latent = pipe("draw.", max_new_tokens=8, num_inference_steps=1, max_images=1, output_type="latent")
    array = pipe("draw.", max_new_tokens=8, num_inference_steps=1, max_images=1, output_type="np")
    assert latent.images[0][0].shape == (4, 8, 8)
    assert array.images[0][0].shape == (16, 16, 3) and 0 <= array.images[0][0].min() <= array.images[0][0].max() <= 1


def test_stochastic_sampling_draws_each_pictures_step_noise_from_its_own_generator(make_pipeline):
    """A scheduler with `stochastic_sampling` noises every flow step afresh, from the picture's own generator
    (or, without one, from torch's global one): a row's picture is the same in a batch as alone, and not the
    one deterministic steps draw from the same start."""
    pipe = make_pipeline("llama", image_scale=6.0)
    kwargs = dict(max_new_tokens=8, num_inference_steps=4, max_images=1, output_type="latent")
    prompts, seeds = ["draw a red circle.", "draw a blue square."], [1, 2]

    def first_pictures(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds else None
        return [images[0] for images in pipe(prompts, generator=generators, **kwargs).images]

    deterministic = first_pictures(prompts, seeds)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    batched = first_pictures(prompts, seeds)
    for k in range(len(prompts)):
        torch.testing.assert_close(batched[k], first_pictures(prompts[k : k + 1], seeds[k : k + 1])[0])
        assert (batched[k] - deterministic[k]).abs().max() > 1e-2
    unseeded = []
    for _ in range(2):
        torch.manual_seed(5)
        unseeded.append(first_pictures(prompts[:1], None)[0])
    torch.testing.assert_close(*unseeded)


def test_image_candidates_keep_the_one_after_which_the_asking_text_is_likeliest(make_pipeline):
    """With image_candidates=K each picture is drawn K times, and the kept one is the candidate after which
    the model finds the text that asked for it (since the row's previous image) likeliest, as a
    teacher-forced pass over [candidate, text] scores it. Each row keeps its own, alone as in a batch."""
    from mmgen.stream import IGNORE_INDEX, TEXT, EncodedSequence
    from mmgen.train_resampler import stack_rows

    pipe = make_pipeline("llama", image_scale=6.0)
    model, codec = pipe.unified, pipe.codec
    kwargs = dict(max_new_tokens=12, num_inference_steps=2, max_images=2, output_type="latent", image_candidates=3)
    prompts, seeds = ["draw a red circle.", "draw a blue square."], [4, 5]
    rounds = []
    score = pipe.candidate_scores

    def spy(rows, candidates):
        scores = score(rows, candidates)
        rounds.append(([r.index for r in rows], [r.text_only_ids[r.asking_from:] for r in rows], candidates.clone(),
                       scores))
        return scores

    pipe.candidate_scores = spy
    out = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    del pipe.candidate_scores
    assert len(rounds) == 2 and all(len(images) == 2 for images in out.images), "two rounds of two pictures"
    none = model.image_modules.compressor.num_tokens("none")

    def read_after(latent, ids):  # a teacher-forced sequence: the candidate as a context image, then the text
        image = codec.encode([Image(latent=latent)], [none])
        ids = torch.tensor(ids)
        return EncodedSequence(
            input_ids=torch.cat([image.input_ids, ids]),
            position_ids=torch.cat([image.position_ids, image.next_position + torch.arange(len(ids))]),
            modality=torch.cat([image.modality, torch.full((len(ids),), TEXT)]),
            labels=torch.cat([torch.full((len(image) - 1,), IGNORE_INDEX), ids, torch.tensor([IGNORE_INDEX])]),
            spans=image.spans, latents=image.latents,
        )

    for k, (indices, asked, candidates, scores) in enumerate(rounds):
        for row, ids, latents, row_scores in zip(indices, asked, candidates, scores):
            text = codec.decode_text(ids)
            if k == 0:
                assert text.startswith(prompts[row])
            else:
                assert prompts[row] not in text, "a later picture is asked for by the text since the one before"
            torch.testing.assert_close(out.images[row][k], latents[int(row_scores.argmax())].cpu())
            batch = stack_rows([read_after(latent, ids) for latent in latents], codec.ids.pad)
            with torch.no_grad():
                embeds = model.embed(batch.input_ids, batch.spans, batch.latents)
                hidden, _ = model.run_backbone(embeds, batch.position_ids, batch.attention_mask.to(embeds.dtype))
                logp = model.logits(hidden).log_softmax(-1)
            picked = batch.labels != IGNORE_INDEX
            expected = (logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0] * picked).sum(1)
            torch.testing.assert_close(row_scores, expected, atol=1e-3, rtol=1e-4)
        assert len({float(s) for s in scores.flatten()}) > 1, "candidates differ, and so do their scores"
    for row, prompt in enumerate(prompts):
        alone = pipe(prompt, generator=torch.Generator().manual_seed(seeds[row]), **kwargs)
        for a, b in zip(alone.images[0], out.images[row]):
            torch.testing.assert_close(a, b)


def test_callback_on_step_end_sees_every_flow_step(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(step)
        return {"latents": kwargs["latents"]}

    pipe("draw.", max_new_tokens=4, num_inference_steps=3, max_images=1, callback_on_step_end=callback)
    assert seen[:3] == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(num_inference_steps=-1), "num_inference_steps"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(image_guidance_scale=float("nan")), "image_guidance_scale"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(compression="zip:3"), "compression"),
        (dict(max_new_tokens=5000), "context"),
        (dict(image_candidates=0), "image_candidates"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make_pipeline, kwargs, name):
    pipe = make_pipeline("llama")
    with pytest.raises(ValueError, match=name):
        pipe("draw a circle.", **kwargs)


def test_empty_prompt_and_unreadable_image_are_rejected(make_pipeline, tmp_path):
    from mmgen.image_tokenizer import open_image

    pipe = make_pipeline("llama")
    for empty in ("", "   \n\t", []):
        with pytest.raises(ValueError, match="empty"):
            pipe(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        open_image(broken)
    with pytest.raises(TypeError, match="prompt items"):
        pipe([3.5])


def test_prompt_longer_than_the_context_is_rejected(make_pipeline):
    pipe = make_pipeline("llama")
    with pytest.raises(ValueError, match="prompt 0 is .* tokens"):
        pipe("a red circle. " * 400, max_new_tokens=8)


def test_a_pipeline_loads_in_bfloat16_by_name_and_runs_the_whole_loop(make_pipeline, tmp_path):
    full = make_pipeline("llama", image_scale=5.0)
    full.save_pretrained(tmp_path)
    pipe = MMGenPipeline.from_pretrained(tmp_path, dtype="bfloat16")
    pipe.set_progress_bar_config(disable=True)
    for name in ("backbone", "vae", "model"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    picture = Image(PIL.Image.new("RGB", (16, 16), (200, 30, 30)))
    full([picture, " what is it?"], max_new_tokens=2)  # leaves a float32 latent on the segment
    assert picture.latent.dtype == torch.float32
    out = pipe([picture, " draw a red circle."], max_new_tokens=24, num_inference_steps=2, max_images=2,
               compression="pool:2")
    assert "ITI" in kinds(out.segments[0]) and all(im.size == (16, 16) for im in out.images[0])
    noise = pipe.initial_noise([torch.Generator().manual_seed(3)])
    assert noise.dtype == torch.bfloat16  # what the flow head and the bench's baselines take as they are
    assert torch.equal(noise, full.initial_noise([torch.Generator().manual_seed(3)]).to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'half'"):
        MMGenPipeline.from_pretrained(tmp_path, dtype="half")


def test_the_last_image_reaches_the_flow_head_pooled_over_its_grid():
    """`pool_states` averages a square grid of states over square blocks, keeps what is already small
    enough, and falls back to runs of neighbours for token sets that are not a grid."""
    from mmgen.model import pool_states

    grid = torch.arange(16.0).reshape(16, 1).repeat(1, 3)  # a 4x4 grid, token k holds k
    pooled = pool_states(grid, 4)
    assert pooled[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5], "the means of the four 2x2 blocks, row-major"
    assert pool_states(grid, 16) is grid
    assert torch.equal(pool_states(grid[:3], 4), grid[:3])
    runs = pool_states(torch.arange(6.0)[:, None], 3)
    assert runs[:, 0].tolist() == [0.5, 2.5, 4.5], "six tokens, not a grid: pairs of neighbours"


def test_the_reference_latent_stays_whole_when_context_images_are_compressed(make_pipeline):
    """Compression shrinks what a context image costs the backbone; the flow head's reference is one latent
    per row beside it, so it reaches the head whole at every level."""
    pipe = make_pipeline("llama", image_scale=50.0, head_reference=True)
    prompt = pipe.encode_images([Image(image=PIL.Image.new("RGB", (16, 16), (30, 30, 200))), Text(" now red:")])
    model = pipe.unified
    given, velocity = [], model.velocity
    model.velocity = lambda *args: given.append(args[4]) or velocity(*args)
    pipe([prompt], max_new_tokens=2, num_inference_steps=1, max_images=1, compression="pool:4",
         output_type="latent")
    del model.velocity
    assert pipe.last_stats.tokens_per_context_image == 1
    assert given and given[0].shape[1] == model.image_modules.config.grid_size ** 2
    torch.testing.assert_close(given[0][0], model.image_tokenizer.patchify(prompt[0].latent[None])[0])


@pytest.mark.parametrize("setting,argument,module,width", [("reference_input", "reference", "reference_in", 16),
                                                            ("plan_input", "plan", "plan_in", 32)])
def test_a_patch_input_starts_at_zero_and_a_head_without_one_refuses_it(setting, argument, module, width):
    """At zero a reference or plan input changes no velocity, so a stage can add it to a trained head; trained off
    zero, what it gives each patch steers the velocity. A head without it names the setting it lacks."""
    from mmgen.flow_head import FlowHead

    torch.manual_seed(0)
    head = FlowHead(token_dim=16, grid_size=4, cond_dim=32, hidden_size=32, num_layers=2, num_heads=2,
                    **{setting: True})
    with torch.no_grad():
        for layer in [block.ada for block in head.blocks] + [head.ada_out, head.out]:
            torch.nn.init.normal_(layer.weight, std=0.05)
        x, t, cond, given = torch.randn(2, 16, 16), torch.rand(2), torch.randn(2, 3, 32), torch.randn(2, 16, width)
        torch.testing.assert_close(head(x, t, cond, **{argument: given}), head(x, t, cond), atol=0, rtol=0)
        torch.nn.init.normal_(getattr(head, module).weight, std=0.05)
        assert not torch.allclose(head(x, t, cond, **{argument: given}), head(x, t, cond))
        torch.testing.assert_close(head(x, t, cond, **{argument: torch.zeros_like(given)}), head(x, t, cond))
        plain = FlowHead(token_dim=16, grid_size=4, cond_dim=32, hidden_size=32, num_layers=2, num_heads=2)
        with pytest.raises(ValueError, match=setting):
            plain(x, t, cond, **{argument: given})


def test_condition_order_starts_at_zero_and_then_tells_the_head_which_token_came_first():
    """Without condition order the joint attention reads the condition as a set: swapping two condition tokens
    changes no velocity. Condition order starts at zero, so a stage adds it to a trained head unchanged; trained
    off zero, the same swap changes the velocity."""
    from mmgen.flow_head import FlowHead

    torch.manual_seed(0)
    head = FlowHead(token_dim=16, grid_size=4, cond_dim=32, hidden_size=32, num_layers=2, num_heads=2,
                    condition_order=True)
    plain = FlowHead(token_dim=16, grid_size=4, cond_dim=32, hidden_size=32, num_layers=2, num_heads=2)
    with torch.no_grad():
        for layer in [block.ada for block in head.blocks] + [head.ada_out, head.out]:
            torch.nn.init.normal_(layer.weight, std=0.05)
        plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("cond_order.")})
        x, t, cond = torch.randn(2, 16, 16), torch.rand(2), torch.randn(2, 3, 32)
        swapped = cond[:, [0, 2, 1]]
        torch.testing.assert_close(head(x, t, cond), plain(x, t, cond), atol=0, rtol=0)
        torch.testing.assert_close(plain(x, t, swapped), plain(x, t, cond), atol=1e-5, rtol=1e-5)
        torch.nn.init.normal_(head.cond_order.weight, std=0.2)
        moved = (head(x, t, swapped) - head(x, t, cond)).abs().max()
        assert moved > 100 * (plain(x, t, swapped) - plain(x, t, cond)).abs().max() and moved > 1e-5, moved


def test_patch_convolutions_let_an_image_token_see_its_neighbours():
    """Without them each context-image token embeds its own patch alone; with them (once trained off zero)
    a change to one patch reaches the tokens around it, and only those."""
    from mmgen.model import ImageModules

    torch.manual_seed(0)
    modules = ImageModules(backbone_hidden_size=32, token_dim=16, grid_size=4, image_size=16, patch_size=2,
                           num_queries=4, head_hidden_size=32, head_layers=2, head_heads=2, image_in_convs=1)
    tokens = torch.randn(1, 16, 16)
    nudged = tokens.clone()
    nudged[0, 5] += 1.0  # row 1, column 1 of the 4x4 grid
    with torch.no_grad():
        same = modules.embed_image_tokens(nudged) - modules.embed_image_tokens(tokens)
        assert same.abs().amax(-1)[0].nonzero().flatten().tolist() == [5], "at zero they change nothing"
        torch.nn.init.normal_(modules.patch_convs.out.weight)
        changed = (modules.embed_image_tokens(nudged) - modules.embed_image_tokens(tokens)).abs().amax(-1)[0] > 0
    neighbours = [r * 4 + c for r in range(3) for c in range(3)]  # the 3x3 block around (1, 1)
    assert changed.nonzero().flatten().tolist() == neighbours
