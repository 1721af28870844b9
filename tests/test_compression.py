"""Visual-token compression: every method's contract, its defining property, the prune-attn scores, the
learned resampler and its recipe, and compression inside the pipeline and the benchmark."""

from __future__ import annotations

import json
import math
import re

import PIL.Image
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler

from mmgen import Image, Text
from mmgen.attention_scores import received_attention
from mmgen.compression import CompressionSpec, VisualCompressor, merge_tokens
from mmgen.flow_head import square_grid
from mmgen.model import ImageModules
from mmgen.pipelines import MMGenPipeline

from .conftest import tiny_backbone, tiny_vae

GRID = 8
DIM = 16
LEVELS = [16, 8]


@pytest.fixture
def compressor() -> VisualCompressor:
    torch.manual_seed(0)
    return VisualCompressor(GRID, dim=DIM, resampler_queries=LEVELS)


def grid() -> torch.Tensor:
    return square_grid(GRID)


def regions(values: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """A (1, N, D) token grid whose token i is values[labels[i]]."""
    return torch.stack([values[int(k)] for k in labels.flatten()])[None]


def subset_at_original_coords(tokens, coords, out, out_coords) -> bool:
    for token, coord in zip(out[0], out_coords[0]):
        index = int(coord[0]) * GRID + int(coord[1])
        if not (coord == coord.round()).all() or not torch.equal(tokens[0, index], token):
            return False
    return True


SPECS = ["none", "pool:2", "pool:4", "merge:16", "merge:8", "merge:1", "prune-dup:16", "prune-dup:8",
         "prune-attn:16", "prune-attn:8", "dct:16", "dct:8", "dct:12", "resampler:16", "resampler:8"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_returns_the_requested_count_with_coordinates_inside_the_grid(compressor, spec):
    tokens = torch.randn(3, GRID * GRID, DIM)
    out, coords = compressor(tokens, grid(), spec, importance=torch.rand(3, GRID * GRID))
    m = compressor.num_tokens(spec)
    assert out.shape == (3, m, DIM) and coords.shape == (3, m, 2)
    assert torch.isfinite(out).all()
    assert (coords >= 0).all() and (coords <= GRID - 1).all()


def test_token_counts_follow_the_spec(compressor):
    assert compressor.num_tokens("none") == 64
    assert compressor.num_tokens("pool:2") == 16 and compressor.num_tokens("pool:4") == 4
    for method in ("merge", "prune-dup", "prune-attn", "dct", "resampler"):
        assert compressor.num_tokens(f"{method}:8") == 8


def test_none_is_the_identity(compressor):
    tokens = torch.randn(2, 64, DIM)
    out, coords = compressor(tokens, grid(), "none")
    assert torch.equal(out, tokens)
    assert torch.equal(coords, grid().expand(2, -1, -1))


def test_pool_of_a_constant_image_is_constant_and_sits_at_block_centres(compressor):
    value = torch.randn(DIM)
    out, coords = compressor(value.expand(1, 64, DIM), grid(), "pool:2")
    assert torch.allclose(out, value.expand(1, 16, DIM))
    centres = torch.tensor([[r * 2 + 0.5, c * 2 + 0.5] for r in range(4) for c in range(4)])
    assert torch.equal(coords[0], centres)


def test_merging_identical_tokens_changes_nothing(compressor):
    value = torch.randn(DIM)
    out, _ = compressor(value.expand(2, 64, DIM).clone(), grid(), "merge:5")
    assert torch.allclose(out, value.expand(2, 5, DIM), atol=1e-6)


def test_merge_keeps_size_weighted_sums_of_tokens_and_coordinates():
    tokens = torch.randn(2, 64, DIM)
    coords = grid().expand(2, -1, -1)
    out, out_coords, sizes = merge_tokens(tokens, coords, 11)
    assert torch.equal(sizes.sum(1), torch.full((2,), 64.0))
    assert torch.allclose((out * sizes[..., None]).sum(1), tokens.sum(1), atol=1e-4)
    assert torch.allclose((out_coords * sizes[..., None]).sum(1), coords.sum(1), atol=1e-4)


def test_merge_of_two_regions_gives_their_means_at_their_centroids(compressor):
    left, right = torch.zeros(DIM), torch.zeros(DIM)
    left[0], right[1] = 1.0, 1.0  # orthogonal: never similar
    labels = (grid()[:, 1] >= 3).long()  # columns 0-2 and 3-7: regions of 24 and 40 tokens
    tokens = regions([left, right], labels)
    out, coords, sizes = merge_tokens(tokens, grid()[None], 2)
    by_size = sorted(zip(sizes[0].tolist(), out[0], coords[0]), key=lambda item: item[0])
    assert [s for s, _, _ in by_size] == [24.0, 40.0]
    assert torch.allclose(by_size[0][1], left) and torch.allclose(by_size[1][1], right)
    assert torch.allclose(by_size[0][2], grid()[labels == 0].mean(0))
    assert torch.allclose(by_size[1][2], grid()[labels == 1].mean(0))


def test_dct_with_every_coefficient_reconstructs_the_input(compressor):
    tokens = torch.randn(2, 64, DIM)
    out, coords = compressor(tokens, grid(), "dct:64")
    assert torch.allclose(out, tokens, atol=1e-5)
    assert torch.allclose(coords[0], grid())


def test_dct_keeps_a_constant_image_constant_and_low_frequencies_exactly(compressor):
    value = torch.randn(DIM)
    out, coords = compressor(value.expand(1, 64, DIM), grid(), "dct:16")
    assert torch.allclose(out, value.expand(1, 16, DIM), atol=1e-5)
    assert torch.equal(coords, compressor(value.expand(1, 64, DIM), grid(), "pool:2")[1])
    # A horizontal ramp of 2 steps (columns 0-3 vs 4-7) has energy only at low horizontal frequencies, so a
    # 4×4 low-pass keeps its left/right halves apart with left < right.
    ramp = (grid()[:, 1] >= 4).float()[None, :, None].expand(1, 64, DIM)
    low, low_coords = compressor(ramp, grid(), "dct:16")
    left = low[0, low_coords[0, :, 1] < 3.5, 0]
    right = low[0, low_coords[0, :, 1] > 3.5, 0]
    assert left.max() < right.min()


def test_prune_dup_keeps_original_tokens_and_one_of_each_duplicate_group(compressor):
    values = [torch.randn(DIM) for _ in range(4)]
    labels = (grid()[:, 0] >= 4).long() * 2 + (grid()[:, 1] >= 4).long()  # four quadrants
    tokens = regions(values, labels)
    out, coords = compressor(tokens, grid(), "prune-dup:4")
    assert subset_at_original_coords(tokens, coords, out, coords)
    kept = {int(labels[int(c[0]) * GRID + int(c[1])]) for c in coords[0]}
    assert kept == {0, 1, 2, 3}


def test_prune_attn_keeps_the_most_attended_tokens_in_raster_order(compressor):
    tokens = torch.randn(1, 64, DIM)
    importance = torch.rand(1, 64)
    out, coords = compressor(tokens, grid(), "prune-attn:8", importance=importance)
    assert subset_at_original_coords(tokens, coords, out, coords)
    kept = (coords[0, :, 0] * GRID + coords[0, :, 1]).long()
    assert kept.tolist() == sorted(importance[0].topk(8).indices.tolist())


def test_prune_attn_without_scores_says_where_they_come_from(compressor):
    with pytest.raises(ValueError, match="prune-attn:8 needs attention scores"):
        compressor(torch.randn(1, 64, DIM), grid(), "prune-attn:8")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_attention_scores_equal_the_backbones_own_attention_weights(tokenizer, kind):
    backbone = tiny_backbone(kind, tokenizer)
    backbone.config._attn_implementation = "eager"
    vision, readers = torch.randn(2, 16, 32), torch.randn(2, 5, 32)
    reader_positions = torch.tensor([2, 3, 4, 6, 6])
    length = 21
    mask = torch.zeros(length, length).masked_fill_(~torch.ones(length, length, dtype=torch.bool).tril(),
                                                     torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference = backbone.base_model(
            inputs_embeds=torch.cat([vision, readers], 1),
            position_ids=torch.cat([torch.zeros(16, dtype=torch.long), reader_positions])[None].expand(2, -1),
            attention_mask=mask[None, None].expand(2, 1, -1, -1),
            output_attentions=True,
        ).attentions
        for layer in (0, 1):
            scores = received_attention(backbone, vision, readers, reader_positions, layer)
            expected = reference[layer][:, :, 16:, :16].mean(dim=(1, 2))
            assert torch.allclose(scores, expected, atol=1e-6)


def test_prune_attn_on_a_backbone_without_q_and_k_projections_fails_clearly(make_pipeline):
    pipe = make_pipeline("gpt2")
    with pytest.raises(ValueError, match="prune-attn needs a backbone .* q_proj and k_proj"):
        pipe.unified.image_embeddings(torch.randn(1, 4, 8, 8), "prune-attn:4")


def test_prune_attn_through_the_model_keeps_subsets_of_the_full_embeddings(make_pipeline):
    model = make_pipeline("qwen2").unified
    latents = torch.randn(2, 4, 8, 8)
    question = model.text_embeddings(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    with torch.no_grad():
        full = model.image_embeddings(latents, "none")
        for readers in (None, question):  # the queries alone, or the text after the image and the queries
            pruned = model.image_embeddings(latents, "prune-attn:4", readers=readers)
            for row in range(2):
                matches = (pruned[row][:, None] - full[row][None]).abs().amax(-1) < 1e-6  # (4, 16)
                assert matches.any(1).all() and matches.sum() == 4


def test_prune_attn_in_a_prompt_is_read_by_the_question_after_each_image(make_pipeline, monkeypatch):
    pipe = make_pipeline("llama")
    model, seen = pipe.unified, []
    monkeypatch.setattr(model, "vision_attention", lambda patches, readers=None: (
        seen.append(readers), torch.rand(patches.shape[0], patches.shape[1]))[1])
    picture = PIL.Image.new("RGB", (16, 16), "red")
    segments = [Image(image=picture), Text(" what color?"), Image(image=picture), Text(" and here?")]
    encoded = pipe.codec.encode(pipe.encode_images(segments), [4, 4], compressions=["prune-attn:4"] * 2)
    with torch.no_grad():
        model.embed(encoded.input_ids[None], [(0, span) for span in encoded.spans], encoded.latents)
    questions = [pipe.codec.tokenizer(" what color?", add_special_tokens=False).input_ids,
                 pipe.codec.tokenizer(" and here?", add_special_tokens=False).input_ids]
    assert len(seen) == 2
    for readers, question in zip(seen, questions):
        assert torch.equal(readers[0], model.text_embeddings(torch.tensor(question)))


def test_resampler_starts_as_area_pooling(compressor):
    tokens = torch.randn(2, 64, DIM)
    with torch.no_grad():
        resampled, coords = compressor(tokens, grid(), "resampler:16")
        pooled, pool_coords = compressor(tokens, grid(), "pool:2")
    assert torch.allclose(resampled, pooled, atol=1e-6) and torch.equal(coords, pool_coords)


def test_resampler_parameters_save_and_load_with_image_modules(tmp_path):
    torch.manual_seed(0)
    modules = ImageModules(backbone_hidden_size=32, token_dim=16, grid_size=4, image_size=16, num_queries=4,
                           head_hidden_size=32, head_layers=1, head_heads=2, resampler_queries=[4, 2])
    with torch.no_grad():
        for p in modules.compressor.resampler.parameters():
            p.add_(torch.randn_like(p))
    modules.save_pretrained(tmp_path)
    loaded = ImageModules.from_pretrained(tmp_path)
    assert loaded.compressor.resampler.levels == (2, 4)
    saved = {k: v for k, v in modules.state_dict().items() if k.startswith("compressor.resampler.")}
    assert saved and all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())
    tokens = torch.randn(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(modules.embed_image_tokens(tokens, "resampler:2"), loaded.embed_image_tokens(tokens, "resampler:2"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("merge:0", "merge:0"),
        ("merge:65", "merge:65"),
        ("prune-dup:100", "prune-dup:100"),
        ("prune-attn:-3", "prune-attn:-3"),
        ("pool:3", "pool:3"),
        ("pool:16", "pool:16"),
        ("dct:11", "dct:11"),
        ("dct", "'dct'"),
        ("resampler:4", "resampler:4"),
        ("tome:4", "unknown compression method 'tome'"),
        ("none:2", "'none' takes no amount"),
    ],
)
def test_bad_specs_raise_value_errors_naming_the_method(compressor, spec, message):
    with pytest.raises(ValueError, match=message):
        compressor.num_tokens(spec)


def test_parse_lists_every_method_and_checks_amounts_against_a_grid():
    with pytest.raises(ValueError, match="none, pool, merge, prune-dup, prune-attn, dct, resampler"):
        CompressionSpec.parse("zip:2")
    assert str(CompressionSpec.parse("merge:64", grid_size=8)) == "merge:64"
    with pytest.raises(ValueError, match="merge:65"):
        CompressionSpec.parse("merge:65", grid_size=8)


def test_a_model_without_a_resampler_says_how_to_train_one():
    with pytest.raises(ValueError, match="no trained resampler.*train_resampler"):
        VisualCompressor(GRID).num_tokens("resampler:16")


# -- the pipeline, the recipe and the benchmark ----------------------------------------------------


def resampler_pipeline(tokenizer, kind: str = "llama") -> MMGenPipeline:
    """The tiny pipeline of conftest, with a resampler for 4 and 2 tokens and a bias toward drawing."""
    backbone = tiny_backbone(kind, tokenizer)
    with torch.no_grad():
        backbone.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids("<|image_start|>")] *= 6.0
    torch.manual_seed(0)
    modules = ImageModules(backbone_hidden_size=32, token_dim=16, grid_size=4, image_size=16, patch_size=2,
                           num_queries=4, head_hidden_size=32, head_layers=2, head_heads=2,
                           resampler_queries=[4, 2])
    with torch.no_grad():
        modules.compressor.resampler.out.weight.normal_(0, 0.1)  # not the pooling it starts as
    pipe = MMGenPipeline(backbone, tokenizer, tiny_vae(), modules, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("spec", ["pool:2", "merge:4", "prune-dup:2", "prune-attn:4", "dct:2", "resampler:4"])
def test_compression_composes_with_batching(tokenizer, spec):
    pipe = resampler_pipeline(tokenizer)
    red = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    blue = PIL.Image.new("RGB", (16, 16), (30, 30, 200))
    prompts = [[red, " what colour is it?"], ["a story.", blue, " then", red, " and then"], ["draw a circle."]]
    kwargs = dict(max_new_tokens=8, num_inference_steps=1, max_images=1, compression=spec, output_type="latent")
    seeds = [1, 2, 3]
    batched = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    assert pipe.last_stats.tokens_per_context_image == pipe.model.compressor.num_tokens(spec)
    for k, prompt in enumerate(prompts):
        single = pipe([prompt], generator=[torch.Generator().manual_seed(seeds[k])], **kwargs)
        assert batched.text[k] == single.text[0]


def test_resampler_recipe_trains_only_the_resampler(tokenizer, tmp_path, make_pipeline):
    from mmgen.config import parse_config
    from mmgen.model_card import write_model_card
    from mmgen.train_resampler import ResamplerArguments, train_resampler

    make_pipeline("llama").save_pretrained(tmp_path / "base")
    config = tmp_path / "resampler.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"), "levels": [4, 2],
        "max_steps": 2, "batch_size": 3, "learning_rate": 0.01, "warmup_steps": 1, "log_every": 1,
        "task_weights": {"i2t": 1.0, "story": 1.0},
    }))
    (args,) = parse_config((ResamplerArguments,), config)
    rows = train_resampler(args)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)

    before = MMGenPipeline.from_pretrained(tmp_path / "base")
    after = MMGenPipeline.from_pretrained(tmp_path / "out")
    assert after.model.compressor.num_tokens("resampler:2") == 2
    old = {**{f"backbone.{k}": v for k, v in before.backbone.state_dict().items()},
           **{f"model.{k}": v for k, v in before.model.state_dict().items()}}
    new = {**{f"backbone.{k}": v for k, v in after.backbone.state_dict().items()},
           **{f"model.{k}": v for k, v in after.model.state_dict().items()}}
    assert all(torch.equal(v, new[k]) for k, v in old.items()), "everything but the resampler is frozen"
    trained = [k for k in new if k not in old]
    assert trained and all(k.startswith("model.compressor.resampler.") for k in trained)
    assert not torch.equal(new["model.compressor.resampler.out.weight"], torch.zeros_like(new["model.compressor.resampler.out.weight"]))
    # A rerun into an exported model's folder logs its own rows only and lists the resampler in the card.
    (tmp_path / "out" / "training_state.json").write_text(json.dumps({"step": 9, "recipe": "configs/tiny.yaml"}))
    write_model_card(tmp_path / "out", [], "configs/tiny.yaml", 9)
    train_resampler(args)
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (f"the learned resampler for resampler:2, resampler:4 (`python -m mmgen.train_resampler "
            f"configs/resampler.yaml --output_dir {tmp_path / 'out'}`)") in (tmp_path / "out" / "README.md").read_text()


def test_the_resampler_learns_from_text_in_the_forms_the_model_was_trained_to_write(make_pipeline):
    """A model that writes a reading plan before each answer is distilled on answers with that plan."""
    from mmgen.train_resampler import ResamplerArguments, ResamplerData, with_resampler

    pipe = make_pipeline("llama")
    with_resampler(pipe, [4], num_layers=1, num_heads=2)
    args = ResamplerArguments(levels=[4], batch_size=4, task_weights={"i2t": 1.0})
    cell = re.compile(r" [a-h][1-8][,.]")

    def texts(forms):
        _, teacher = ResamplerData(pipe.codec, pipe.unified, args, forms).batch(1)
        return [pipe.tokenizer.decode(row[row != pipe.codec.ids.pad]) for row in teacher.input_ids]

    assert all(cell.search(text) for text in texts({"reading_plans": 1.0}))
    assert not any(cell.search(text) for text in texts({}))


def test_retention_is_the_smaller_share_kept_of_image_to_text_and_story_consistency():
    """A level that keeps image→text accuracy but halves story consistency keeps half, not three quarters;
    a score the baseline has at zero, or a run did not measure, says nothing."""
    from mmgen.evals.bench_compression import retention

    none = {"i2t_accuracy": 0.8, "story_consistency": 0.6}
    assert retention({"i2t_accuracy": 0.8, "story_consistency": 0.3}, none) == pytest.approx(0.5)
    assert retention({"i2t_accuracy": 0.4, "story_consistency": 0.6}, none) == pytest.approx(0.5)
    assert retention({"i2t_accuracy": 0.6, "story_consistency": float("nan")}, none) == pytest.approx(0.75)
    assert retention({"i2t_accuracy": 0.6, "story_consistency": 0.1},
                     {"i2t_accuracy": 0.8, "story_consistency": 0.0}) == pytest.approx(0.75)
    assert math.isnan(retention({"i2t_accuracy": 0.6}, {"i2t_accuracy": 0.0}))


def test_compression_bench_smoke_runs_on_a_tiny_pipeline(tokenizer, tmp_path):
    from mmgen.evals.bench import BenchOptions, run_bench

    pipe = resampler_pipeline(tokenizer)
    (result,) = run_bench(["compression"], pipe, BenchOptions(repeats=1, quick=True, out_dir=tmp_path))
    rows = {r["compression"]: r for r in result.rows}
    expected = {"none", "pool:2", "pool:4", *(f"{m}:{n}" for m in ("merge", "prune-dup", "prune-attn", "dct",
                                                                    "resampler") for n in (4, 2))}
    assert set(rows) == expected
    assert all("note" not in r for r in rows.values())
    assert rows["none"]["tokens_per_image"] == 16 and rows["merge:2"]["tokens_per_image"] == 2
    assert rows["none"]["kv_bytes_per_image"] == 4 * rows["pool:2"]["kv_bytes_per_image"]
    assert rows["none"]["kv_bytes_per_image"] == 8 * rows["dct:2"]["kv_bytes_per_image"]
    assert result.ratios["kv_bytes_ratio_at_4x"] == 4.0
    assert result.ratios["prefill_speedup_at_4x"] > 0
    assert all(0.0 <= r["i2t_accuracy"] <= 1.0 for r in rows.values())
    assert set(result.ratios) == {"best_retention_at_4x", "best_retention_at_8x", "kv_bytes_ratio_at_4x",
                                  "prefill_speedup_at_4x"}
    assert (tmp_path / "compression_accuracy.png").stat().st_size > 0
