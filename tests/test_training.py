"""The trainer: learning, exact resume after SIGKILL, multi-process, pretrained parts and jsonl data."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml

from mmgen.config import ModelArguments, TrainArguments, parse_config
from mmgen.model import RESAMPLER_PREFIX, cosine_with_warmup
from mmgen.model_card import record_shapesbench, trained_text_forms
from mmgen.pipelines import MMGenPipeline
from mmgen.stream import IGNORE_INDEX
from mmgen.train_resampler import with_resampler
from mmgen.training import Trainer, draw_like

from .conftest import TOKENIZER_DIR, tiny_backbone, tiny_vae

TINY_MODEL = dict(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_position_embeddings=1024,
    image_size=16, patch_size=2, num_queries=4, head_hidden_size=32, head_layers=2, head_heads=2,
    tokenizer=str(TOKENIZER_DIR),
)
TINY_TRAIN = dict(batch_size=6, max_length=512, learning_rate=3e-3, warmup_steps=3, flow_repeats=2, log_every=1,
                  save_every=1000, data_workers=0, seed=3)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


def write_config(path: Path, vae_dir: Path, **overrides) -> Path:
    config = {**TINY_MODEL, **TINY_TRAIN, "vae": str(vae_dir), "output_dir": str(path / "run"), **overrides}
    file = path / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_loss_decreases_on_a_tiny_config_in_30_steps_and_exports_a_pipeline(tmp_path, vae_dir):
    export = tmp_path / "model"
    config = write_config(tmp_path, vae_dir, max_steps=30, export_dir=str(export), recipe="configs/tiny.yaml",
                          sampling_shift=3.0, stochastic_sampling=True, reading_plans=0.5)
    model_args, args = parse_config((ModelArguments, TrainArguments), config)
    rows = Trainer(model_args, args).train()
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()
    pipe = MMGenPipeline.from_pretrained(export)
    assert pipe.model.config.num_queries == TINY_MODEL["num_queries"]
    assert pipe.scheduler.config.shift == 3.0, "the recipe's sampling shift is saved with the scheduler"
    assert pipe.scheduler.config.stochastic_sampling, "and so is its sampler"
    card = (export / "README.md").read_text()
    assert "configs/tiny.yaml" in card and (export / "training_curve.png").stat().st_size > 0
    assert "- sampler: `FlowMatchEulerDiscreteScheduler`, shift 3.0, stochastic steps" in card
    assert trained_text_forms(export) == {"ordered_layouts": 0.0, "layout_plans": 0.0, "story_plans": 0.0,
                                          "named_story_plans": 0.0, "reading_plans": 0.5,
                                          "worked_answers": 0.0, "tallied_answers": 0.0}, \
        "later recipes read the text forms it learnt"

    # The card is written again from the folder when later recipes add to it, and the curve stays.
    assert "## Added after training" not in card
    (export / "drafter").mkdir()  # what `mmgen train-drafter` adds later
    with_resampler(pipe, [4], num_layers=1, num_heads=2)  # and what the resampler recipe adds
    pipe.model.save_pretrained(export / "model")
    (export / "resampler_recipe.json").write_text(json.dumps({"output_dir": "models/tiny"}))
    record_shapesbench(export, {"single_object": 0.5, "colors": 0.25, "n": {"single_object": 200, "colors": 200}},
                       seed=7)
    card = (export / "README.md").read_text()
    assert "| single_object | 0.500 | 200 |" in card and "| colors | 0.250 | 200 |" in card
    assert "measured at step 30 (seed 7)" in card and "configs/tiny.yaml" in card
    assert "- `drafter/`: the vision-aware draft head (`mmgen train-drafter configs/drafter.yaml`)" in card
    assert ("- `model/`: the learned resampler for resampler:4 "
            "(`python -m mmgen.train_resampler configs/resampler.yaml --output_dir models/tiny`)") in card
    assert "![training curve](training_curve.png)" in card


def test_resume_after_sigkill_matches_an_unbroken_run(tmp_path, vae_dir):
    steps = 10
    (tmp_path / "a").mkdir()
    unbroken = write_config(tmp_path / "a", vae_dir, max_steps=steps, save_every=2)
    subprocess.run([sys.executable, "-m", "mmgen.cli", "train", str(unbroken)], check=True, capture_output=True)
    reference = {r["step"]: r["loss"] for r in read_log(tmp_path / "a" / "run")}

    (tmp_path / "b").mkdir()
    config = write_config(tmp_path / "b", vae_dir, max_steps=steps, save_every=2)
    run = tmp_path / "b" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmgen.cli", "train", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        state = run / "checkpoint" / "trainer_state.json"
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert killed_at < steps, "the run must be killed before it finishes"
    assert not (run / "checkpoint.tmp").exists() or not (run / "checkpoint.tmp" / "trainer_state.json").exists()
    subprocess.run([sys.executable, "-m", "mmgen.cli", "train", str(config)], check=True, capture_output=True)
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1)), "one log row per step, none doubled"
    for row in resumed:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5, abs=1e-6), row["step"]


def test_two_process_smoke_run(tmp_path, vae_dir):
    config = write_config(tmp_path, vae_dir, max_steps=3, save_every=3)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmgen.cli", "train", str(config)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_training_starts_from_pretrained_parts_on_disk(tmp_path, vae_dir, tokenizer, kind):
    backbone_dir = tmp_path / "backbone"
    backbone = tiny_backbone(kind, tokenizer)
    backbone.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    config = write_config(tmp_path, vae_dir, max_steps=2)
    model_args, args = parse_config((ModelArguments, TrainArguments), config,
                                    ["--backbone", str(backbone_dir), "--vae", str(vae_dir)])
    trainer = Trainer(model_args, args)
    assert type(trainer.unwrapped.backbone).__name__ == type(backbone).__name__
    start = trainer.unwrapped.backbone.get_input_embeddings().weight.detach().clone()
    torch_equal = (start[:10] == backbone.get_input_embeddings().weight[:10]).all()
    assert bool(torch_equal), "the backbone's pretrained weights are loaded"
    rows = trainer.train()
    assert len(rows) == 2


def test_trains_on_interleaved_jsonl_with_image_folders(tmp_path, vae_dir):
    images = tmp_path / "images"
    images.mkdir()
    for k, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        PIL.Image.new("RGB", (16, 16), color).save(images / f"{k}.png")
    rows = [
        {"texts": ["a red square.", None, " then a blue one.", None], "images": [None, "0.png", None, "1.png"]},
        {"texts": [None, "just text after an image."], "images": ["1.png", None]},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path, vae_dir, max_steps=2, data=str(data), images_dir=str(images), batch_size=2)
    model_args, args = parse_config((ModelArguments, TrainArguments), config)
    out = Trainer(model_args, args).train()
    assert len(out) == 2 and all(r["flow_loss"] > 0 for r in out)


def test_bad_configs_are_rejected_with_clear_messages(tmp_path, vae_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_config((ModelArguments, TrainArguments), bad)
    with pytest.raises(ValueError, match="not found"):
        parse_config((ModelArguments, TrainArguments), tmp_path / "missing.yaml")
    config = write_config(tmp_path, vae_dir, max_steps=2, compression_levels=["pool:3"])
    model_args, args = parse_config((ModelArguments, TrainArguments), config)
    with pytest.raises(ValueError, match="pool:3"):
        Trainer(model_args, args)
    config = write_config(tmp_path, vae_dir, max_steps=2, category_weights={"posture": 2.0})
    with pytest.raises(ValueError, match="unknown category 'posture'"):
        Trainer(*parse_config((ModelArguments, TrainArguments), config))
    for option, value in (("timestep_shift", 0.0), ("timestep_shift", [1.0, 2.0, 3.0]), ("sampling_shift", -1.0),
                          ("ordered_layouts", 1.5), ("layout_plans", 2.0), ("story_plans", -0.5),
                          ("reading_plans", 3.0), ("plan_lookups", 1.5), ("text_loss_per", "batch"),
                          ("named_story_plans", 1.1), ("worked_answers", -0.1), ("tallied_answers", 2.0),
                          ("story_plan_lookups", -1.0)):
        config = write_config(tmp_path, vae_dir, max_steps=2, **{option: value})
        with pytest.raises(ValueError, match=option):
            Trainer(*parse_config((ModelArguments, TrainArguments), config))


def test_ordered_layouts_reach_the_data_and_timestep_shift_draws_flow_times_toward_noise(tmp_path, vae_dir):
    from mmgen.shapesworld import ShapesWorld

    trainer = Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
        tmp_path, vae_dir, max_steps=1, task_weights={"t2i": 1.0}, ordered_layouts=0.5, layout_plans=0.25,
        story_plans=0.75, reading_plans=0.5, plan_lookups=0.25, named_story_plans=0.6, worked_answers=0.4,
        tallied_answers=0.3, story_plan_lookups=0.2)))
    worlds = []
    trainer.data.world_cls = lambda **kwargs: worlds.append(ShapesWorld(**kwargs)) or worlds[-1]
    model, batch = trainer.unwrapped, trainer.data.batch(0)
    assert worlds and all((world.ordered_layouts, world.layout_plans, world.story_plans, world.reading_plans,
                           world.plan_lookups, world.named_story_plans, world.worked_answers, world.tallied_answers,
                           world.story_plan_lookups)
                          == (0.5, 0.25, 0.75, 0.5, 0.25, 0.6, 0.4, 0.3, 0.2) for world in worlds)
    drawn, velocity = [], model.velocity
    model.velocity = lambda x_t, t, *args: drawn.append(t) or velocity(x_t, t, *args)
    for shift in (1.0, 3.0, [1.0, 3.0, 1.0, 3.0]):
        model(batch, flow_repeats=4, generator=torch.Generator().manual_seed(0), timestep_shift=shift)
    model(batch, flow_repeats=4, generator=torch.Generator().manual_seed(0))
    plain, shifted, per_repeat, default = drawn
    assert torch.equal(default, plain)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain)) and (shifted > plain).all()
    # One shift per repeat: each repeat is a block of the batch's pictures.
    plain, shifted, per_repeat = (t.view(4, -1) for t in (plain, shifted, per_repeat))
    assert torch.equal(per_repeat[0::2], plain[0::2]) and torch.allclose(per_repeat[1::2], shifted[1::2])


def test_text_loss_per_sample_reaches_the_batches(tmp_path, vae_dir):
    """With `text_loss_per: sample` every sample of a batch that has text targets carries one unit of weight."""
    batches = {}
    for per in ("token", "sample"):
        config = write_config(tmp_path, vae_dir, max_steps=1, text_loss_per=per, task_weights={"i2t": 1.0})
        batches[per] = Trainer(*parse_config((ModelArguments, TrainArguments), config)).data.batch(0)
    assert batches["token"].label_weights is None
    weights, labels = batches["sample"].label_weights, batches["sample"].labels
    assert ((weights > 0) == (labels != IGNORE_INDEX)).all()
    assert weights.sum().item() == pytest.approx(TINY_TRAIN["batch_size"])


def test_yaml_words_no_and_off_keep_their_meaning_in_a_config(tmp_path):
    config = tmp_path / "words.yaml"
    config.write_text("mixed_precision: no\nbackbone_type: on\ndata: off\n")
    model_args, args = parse_config((ModelArguments, TrainArguments), config)
    assert (args.mixed_precision, model_args.backbone_type, args.data) == ("no", "on", "off")
    config.write_text("mixed_precision: bf16\nmax_steps: 7\n")
    assert parse_config((ModelArguments, TrainArguments), config)[1].max_steps == 7


def test_a_flag_overrides_a_list_in_the_config(tmp_path):
    config = tmp_path / "levels.yaml"
    config.write_text("compression_levels: [none, pool:2]\n")
    assert parse_config((ModelArguments, TrainArguments), config)[1].compression_levels == ["none", "pool:2"]
    flags = ["--compression_levels", "pool:4"]
    assert parse_config((ModelArguments, TrainArguments), config, flags)[1].compression_levels == ["pool:4"]


def test_timestep_shifts_are_one_number_or_one_per_flow_repeat(tmp_path):
    config = tmp_path / "shifts.yaml"
    config.write_text("timestep_shift: 6\n")
    assert parse_config((ModelArguments, TrainArguments), config)[1].timestep_shift == [6.0]
    config.write_text("timestep_shift: [1, 20]\n")
    assert parse_config((ModelArguments, TrainArguments), config)[1].timestep_shift == [1, 20]
    assert parse_config((ModelArguments, TrainArguments), config, ["--timestep_shift", "2", "8"])[1].timestep_shift \
        == [2.0, 8.0]


def test_a_run_without_checkpoint_can_start_from_an_exported_model(tmp_path, vae_dir, caplog):
    export_first_stage(tmp_path, vae_dir, "model", max_steps=3)
    # The exported model gained a learned resampler afterwards, as the default model has.
    exported = MMGenPipeline.from_pretrained(tmp_path / "model")
    with_resampler(exported, [4], num_layers=1, num_heads=2)
    exported.save_pretrained(tmp_path / "model")
    (tmp_path / "b").mkdir()
    second = write_config(tmp_path / "b", vae_dir, max_steps=5, init_from=str(tmp_path / "model"))
    trainer = Trainer(*parse_config((ModelArguments, TrainArguments), second))
    with caplog.at_level(logging.WARNING, logger="mmgen.training"):
        trainer.resume()
    assert "resampler" in caplog.text and "retrain" in caplog.text
    assert trainer.unwrapped.image_modules.compressor.resampler is None
    assert trainer.step == 3
    args = trainer.args
    expected = args.learning_rate * cosine_with_warmup(3, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    assert trainer.schedule.get_last_lr()[0] == pytest.approx(expected)
    for name, tensor in exported.model.state_dict().items():
        if not name.startswith(RESAMPLER_PREFIX):
            assert (trainer.unwrapped.image_modules.state_dict()[name] == tensor).all(), name


def export_first_stage(tmp_path: Path, vae_dir, name: str, max_steps: int = 2, **overrides) -> Path:
    """Train a first stage for a few steps in tmp_path/a and export it to tmp_path/name."""
    (tmp_path / "a").mkdir()
    config = write_config(tmp_path / "a", vae_dir, max_steps=max_steps, export_dir=str(tmp_path / name), **overrides)
    Trainer(*parse_config((ModelArguments, TrainArguments), config)).train()
    return tmp_path / name


def next_stage(tmp_path: Path, vae_dir, source: str, **overrides) -> Trainer:
    """A trainer for a stage in tmp_path/b that starts from the export tmp_path/source."""
    (tmp_path / "b").mkdir()
    config = write_config(tmp_path / "b", vae_dir, init_from=str(tmp_path / source), **overrides)
    return Trainer(*parse_config((ModelArguments, TrainArguments), config))


def image_modules_moved(before: Path, after: Path) -> set[str]:
    """The image modules whose weights differ between two exports, after checking that their backbones are
    the same bit for bit."""
    first, second = (MMGenPipeline.from_pretrained(folder) for folder in (before, after))
    for name, tensor in first.backbone.state_dict().items():
        assert torch.equal(second.backbone.state_dict()[name], tensor), name
    weights = second.model.state_dict()
    return {name.split(".")[0] for name, tensor in first.model.state_dict().items()
            if not torch.equal(weights[name], tensor)}


def test_a_stage_can_widen_what_the_flow_head_reads_of_a_model_trained_without(tmp_path, vae_dir):
    """`head_text_tokens` and `head_image_tokens` add no weights, and `head_reference`, `head_condition_order` and
    `head_plan` add projections that start at zero, so a stage starts from a queries-only export and trains the head
    on all it now reads; the export keeps the settings, and the pipeline draws with them."""
    export_first_stage(tmp_path, vae_dir, "plain")
    (tmp_path / "b").mkdir()
    second = write_config(tmp_path / "b", vae_dir, max_steps=4, init_from=str(tmp_path / "plain"),
                          export_dir=str(tmp_path / "reading"), head_text_tokens=6, head_image_tokens=4,
                          head_reference=True, head_condition_order=True, head_plan=True, layout_plans=1.0,
                          # every story picture after the first reads the last one; a drawn picture reads its plan
                          task_weights={"story": 1.0, "t2i": 1.0})
    rows = Trainer(*parse_config((ModelArguments, TrainArguments), second)).train()
    assert rows and all(math.isfinite(r["flow_loss"]) for r in rows)
    pipe = MMGenPipeline.from_pretrained(tmp_path / "reading")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.config.head_text_tokens == 6 and pipe.model.config.head_image_tokens == 4
    assert pipe.model.config.head_reference and pipe.model.flow_head.reference_in.weight.abs().sum() > 0, \
        "the reference input learns off zero from the stories' earlier pictures"
    assert pipe.model.flow_head.cond_order.weight.abs().sum() > 0, "so does the condition order"
    assert pipe.model.config.head_plan and pipe.model.flow_head.plan_in.weight.abs().sum() > 0, \
        "and the plan input, from the plans written before the drawn pictures"
    out = pipe("draw a red circle.", max_new_tokens=6, num_inference_steps=2, max_images=2)
    assert out.segments[0], "the pipeline runs with a head that reads text and the last image"
    with pytest.raises(ValueError, match="head_text_tokens"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(tmp_path, vae_dir, head_text_tokens=-1)))


def test_a_stage_can_train_the_flow_head_alone(tmp_path, vae_dir):
    """`trainable_modules` freezes the rest: the backbone and image input keep the exported weights exactly,
    the head moves, and a resumed run sees the same split."""
    export_first_stage(tmp_path, vae_dir, "plain")
    (tmp_path / "b").mkdir()
    head_only = write_config(tmp_path / "b", vae_dir, max_steps=5, init_from=str(tmp_path / "plain"),
                             export_dir=str(tmp_path / "tuned"), trainable_modules=["image_modules.flow_head"],
                             task_weights={"t2i": 1.0})
    rows = Trainer(*parse_config((ModelArguments, TrainArguments), head_only)).train()
    assert rows and all(math.isfinite(r["flow_loss"]) for r in rows)
    moved = image_modules_moved(tmp_path / "plain", tmp_path / "tuned")
    assert moved == {"flow_head"}, moved
    resumed = Trainer(*parse_config((ModelArguments, TrainArguments), head_only))
    assert {name.split(".")[1] for name, p in resumed.unwrapped.named_parameters() if p.requires_grad} == {"flow_head"}

    with pytest.raises(ValueError, match="'image_modules.flow_haed' names no part of the model"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
            tmp_path, vae_dir, trainable_modules=["image_modules.flow_haed"])))
    # A task mix that never draws a picture gives the head nothing to learn from: said at the first step.
    no_pictures = write_config(tmp_path, vae_dir, max_steps=1, trainable_modules=["image_modules.flow_head"],
                               task_weights={"i2t": 1.0})
    with pytest.raises(ValueError, match="no loss on the trainable modules"):
        Trainer(*parse_config((ModelArguments, TrainArguments), no_pictures)).train()


def test_a_stage_can_start_a_new_flow_head_of_another_size_on_an_exported_backbone(tmp_path, vae_dir):
    """`fresh_modules` leaves the named modules at their initial weights and loads the rest: a larger head
    starts on the exported backbone and image input, which stay the export's exactly while the head trains.
    Without the setting the sizes clash, in a clear error rather than torch's, and it needs a model to start
    the rest from."""
    export_first_stage(tmp_path, vae_dir, "plain")
    (tmp_path / "b").mkdir()
    larger = dict(head_hidden_size=48, head_layers=3, init_from=str(tmp_path / "plain"), task_weights={"t2i": 1.0},
                  trainable_modules=["image_modules.flow_head"])
    with pytest.raises(ValueError, match="do not fit this model's configuration: flow_head"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
            tmp_path / "b", vae_dir, max_steps=2, **larger))).train()
    fresh = write_config(tmp_path / "b", vae_dir, max_steps=3, export_dir=str(tmp_path / "fresh"),
                         fresh_modules=["image_modules.flow_head"], **larger)
    rows = Trainer(*parse_config((ModelArguments, TrainArguments), fresh)).train()
    assert rows and all(math.isfinite(r["flow_loss"]) for r in rows)
    moved = image_modules_moved(tmp_path / "plain", tmp_path / "fresh")
    assert moved == {"flow_head"}, moved
    after = MMGenPipeline.from_pretrained(tmp_path / "fresh")
    assert after.model.config.head_hidden_size == 48 and len(after.model.flow_head.blocks) == 3
    assert after("draw a red circle.", max_new_tokens=4, num_inference_steps=2, max_images=1).segments[0]

    with pytest.raises(ValueError, match="'image_modules.flow_haed' names no part of the model"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
            tmp_path, vae_dir, init_from=str(tmp_path / "plain"), fresh_modules=["image_modules.flow_haed"])))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="the backbone weights of .* do not fit this model's configuration"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
            tmp_path / "c", vae_dir, max_steps=2, **{**larger, "intermediate_size": 96}))).train()
    with pytest.raises(ValueError, match="fresh_modules .* set init_from"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(
            tmp_path, vae_dir, fresh_modules=["image_modules.flow_head"])))


def test_draw_like_matches_the_mean_and_covariance_of_fewer_rows_than_dimensions():
    rows = torch.randn(5, 8) * torch.linspace(0.5, 2.0, 8) + 3.0
    drawn = draw_like(rows, 200_000, torch.Generator().manual_seed(0))
    assert drawn.shape == (200_000, 8)
    assert torch.allclose(drawn.mean(0), rows.double().mean(0), atol=0.03)
    assert torch.allclose(torch.cov(drawn.T), torch.cov(rows.double().T), atol=0.06)


def test_fresh_tokens_start_a_stage_with_embeddings_like_those_of_the_tokens_in_use(tmp_path, vae_dir):
    """What a long run leaves of tokens it never saw is made here: input embeddings shrunk by weight decay, and
    LM-head rows pushed down alike into one vector. A stage with `fresh_tokens` draws both again like the
    embeddings of the tokens its batches use, so the head can tell the new tokens apart, and leaves the rest."""
    export = export_first_stage(tmp_path, vae_dir, "plain")
    pipe = MMGenPipeline.from_pretrained(export)
    fresh = sorted(set(pipe.codec.text_ids(" e") + pipe.codec.text_ids("7")))
    inputs, outputs = pipe.backbone.get_input_embeddings().weight, pipe.backbone.get_output_embeddings().weight
    with torch.no_grad():
        inputs[fresh] *= 0.01
        outputs[fresh] = outputs[fresh].mean(0)
    pipe.save_pretrained(export)
    before = [inputs.detach().clone(), outputs.detach().clone()]

    trainer = next_stage(tmp_path, vae_dir, "plain", max_steps=3, fresh_tokens=[" e", "7"])
    trainer.resume()
    backbone = trainer.unwrapped.backbone
    in_use = [i for i in set(trainer.data.batch(0).input_ids.flatten().tolist()) if i not in fresh]
    others = torch.ones(len(inputs), dtype=torch.bool)
    others[fresh] = False
    scales = []
    for table, old in zip((backbone.get_input_embeddings().weight, backbone.get_output_embeddings().weight), before):
        after = table.detach()
        assert torch.equal(after[others], old[others])
        centred = after[fresh] - after[fresh].mean(0)
        spread = (after[in_use] - after[in_use].mean(0)).norm(dim=-1).mean()
        assert 0.3 * spread < centred.norm(dim=-1).mean() < 3 * spread
        scales.append(after[in_use].norm(dim=-1).mean())
        assert 0.5 * scales[-1] < after[fresh].norm(dim=-1).mean() < 2 * scales[-1]
    assert (before[0][fresh].norm(dim=-1) < 0.05 * scales[0]).all() and (before[1][fresh] == before[1][fresh[0]]).all()

    with pytest.raises(ValueError, match="fresh_tokens holds '', which has no tokens"):
        next_stage(tmp_path / "b", vae_dir, "../plain", fresh_tokens=[""]).resume()
    with pytest.raises(ValueError, match="fresh_tokens .* set init_from"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(tmp_path, vae_dir, fresh_tokens=["7"])))


def test_a_stage_can_add_patch_convolutions_to_a_model_trained_without(tmp_path, vae_dir):
    """`image_in_convs` adds weights that start at zero: a stage from an export without them embeds images
    exactly as the export did, then trains them, and the export draws with them."""
    export_first_stage(tmp_path, vae_dir, "plain")
    trainer = next_stage(tmp_path, vae_dir, "plain", max_steps=6, export_dir=str(tmp_path / "convs"), image_in_convs=2)
    trainer.resume()
    plain = MMGenPipeline.from_pretrained(tmp_path / "plain").unified
    tok = plain.image_tokenizer
    latents = torch.randn(2, tok.latent_channels, tok.latent_size, tok.latent_size)
    with torch.no_grad():
        assert torch.equal(trainer.unwrapped.image_embeddings(latents), plain.image_embeddings(latents))
    rows = trainer.train()
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    pipe = MMGenPipeline.from_pretrained(tmp_path / "convs")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.config.image_in_convs == 2
    assert pipe.model.patch_convs.out.weight.abs().sum() > 0, "training moved the convolutions off zero"
    out = pipe("draw a red circle.", max_new_tokens=6, num_inference_steps=2, max_images=1)
    assert out.segments[0], "the pipeline runs with patch convolutions"
    with pytest.raises(ValueError, match="image_in_convs"):
        Trainer(*parse_config((ModelArguments, TrainArguments), write_config(tmp_path, vae_dir, image_in_convs=-1)))
    # The other way round, weights the configuration has no place for are refused by name.
    (tmp_path / "c").mkdir()
    back = write_config(tmp_path / "c", vae_dir, max_steps=8, init_from=str(tmp_path / "convs"))
    with pytest.raises(ValueError, match="patch_convs"):
        Trainer(*parse_config((ModelArguments, TrainArguments), back)).resume()


def test_a_stage_can_give_the_backbone_more_key_value_heads(tmp_path, vae_dir):
    """A stage with more key/value heads than its export starts from them repeated: the backbone computes
    exactly what the export's did, then trains the heads apart. A count the saved heads cannot be repeated
    into is refused by name."""
    export_first_stage(tmp_path, vae_dir, "shared", num_kv_heads=1)
    trainer = next_stage(tmp_path, vae_dir, "shared", max_steps=5, export_dir=str(tmp_path / "grown"), num_kv_heads=4)
    trainer.resume()
    shared = MMGenPipeline.from_pretrained(tmp_path / "shared").backbone
    ids = torch.randint(0, shared.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(trainer.unwrapped.backbone(ids).logits, shared(ids).logits)
    trainer.train()
    grown = MMGenPipeline.from_pretrained(tmp_path / "grown").backbone
    assert grown.config.num_key_value_heads == 4
    keys = grown.model.layers[0].self_attn.k_proj.weight.reshape(4, -1, grown.config.hidden_size)
    assert not torch.equal(keys[0], keys[1]), "training moved the repeated heads apart"
    (tmp_path / "c").mkdir()
    odd = write_config(tmp_path / "c", vae_dir, init_from=str(tmp_path / "grown"), num_kv_heads=2)
    with pytest.raises(ValueError, match="repeat key/value heads.*4"):
        Trainer(*parse_config((ModelArguments, TrainArguments), odd)).resume()


def test_the_patch_shape_loss_trains_a_classifier_on_the_tokens_the_backbone_reads(tmp_path, vae_dir):
    """With patch_label_weight each step also classifies the patches of labelled ShapesWorld scenes: the
    classifier learns off zero, the loss is logged and falls, and a stage adds the classifier to an export
    without one. Without ShapesWorld data or the right classes it is refused by name."""
    export_first_stage(tmp_path, vae_dir, "plain")
    rows = next_stage(tmp_path, vae_dir, "plain", max_steps=14, export_dir=str(tmp_path / "labelled"), patch_classes=6,
                      patch_label_weight=1.0, patch_label_images=4, task_weights={"i2t": 1.0}).train()
    losses = [r["patch_loss"] for r in rows]
    assert losses[0] == pytest.approx(math.log(6), rel=1e-3), "a zero classifier starts at chance over six classes"
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0]
    pipe = MMGenPipeline.from_pretrained(tmp_path / "labelled")
    assert pipe.model.patch_classifier.weight.abs().sum() > 0
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe("draw a red circle.", max_new_tokens=4, num_inference_steps=2, max_images=1).segments) == 1
    for overrides, message in (({"patch_label_weight": 1.0}, "patch_classes: 6"),
                               ({"patch_label_weight": 1.0, "patch_classes": 3}, "patch_classes: 6 .*got 3"),
                               ({"patch_label_weight": -1.0, "patch_classes": 6}, "patch_label_weight"),
                               ({"patch_label_weight": 1.0, "patch_classes": 6, "data": str(tmp_path / "d.jsonl")},
                                "data: shapesworld")):
        with pytest.raises(ValueError, match=message):
            Trainer(*parse_config((ModelArguments, TrainArguments), write_config(tmp_path, vae_dir, **overrides)))


def test_a_new_stage_restarts_warm_up_and_decay_at_its_first_step(tmp_path, vae_dir):
    export_first_stage(tmp_path, vae_dir, "model", max_steps=3)
    (tmp_path / "b").mkdir()
    (tmp_path / "model" / "drafter").mkdir()  # distilled from the first stage's weights
    (tmp_path / "model" / "resampler_recipe.json").write_text("{}")
    second = write_config(tmp_path / "b", vae_dir, max_steps=8, stage_start=3, warmup_steps=2,
                          init_from=str(tmp_path / "model"), export_dir=str(tmp_path / "model"))
    trainer = Trainer(*parse_config((ModelArguments, TrainArguments), second))
    trainer.resume()
    assert trainer.step == 3
    args = trainer.args
    # The stage's first step is the first step of its warm-up, not a step far into the old decay.
    assert trainer.schedule.get_last_lr()[0] == pytest.approx(args.learning_rate * 0.5)
    rows = trainer.train()
    assert [r["lr"] for r in rows][-1] == pytest.approx(args.learning_rate * args.min_lr_ratio, rel=1e-3)
    # Exported over the first stage, the card shows both stages' curves.
    card = (tmp_path / "model" / "README.md").read_text()
    assert "(training_curve.png)" in card and "(training_curve_from_step_3.png)" in card
    assert (tmp_path / "model" / "training_curve.png").stat().st_size > 0
    assert not (tmp_path / "model" / "drafter").exists() and "drafter" not in card
    assert not (tmp_path / "model" / "resampler_recipe.json").exists()
    bad = write_config(tmp_path / "b", vae_dir, max_steps=3, stage_start=3)
    with pytest.raises(ValueError, match="stage_start"):
        Trainer(*parse_config((ModelArguments, TrainArguments), bad))
