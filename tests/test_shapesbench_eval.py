"""ShapesBench through the pipeline: the summary, the report, resuming, and an oracle that must score 1.0."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mmgen import Image, Text
from mmgen.evals.shapesbench import format_summary, resolve_categories, run_shapesbench
from mmgen.shapesworld import TASKS, Obj, Scene, bench_samples, render

REQUIRED = ("single_object", "colors", "two_objects", "counting", "position", "color_attribution",
            "t2i_overall", "image_to_text", "story_structure", "story_consistency")
N_CATEGORIES = sum(len(c) for c in TASKS.values())


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models do tiny matrix products; on a shared CPU, syncing threads costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompt_key(prompt) -> tuple:
    return tuple(s.text if isinstance(s, Text) else s.image.tobytes() for s in prompt)


class Oracle:
    """Called like MMGenPipeline; answers every ShapesWorld prompt with its ground-truth answer."""

    def __init__(self, seed: int, n: int, size: int = 64):
        self.answers = {prompt_key(s.prompt): s.answer for s in bench_samples(seed, n, size)}
        self.seen: list[tuple] = []

    def __call__(self, prompts, max_new_tokens, max_images, generator, output_type, **kwargs):
        assert output_type == "pil" and len(generator) == len(prompts)
        keys = [prompt_key(p) for p in prompts]
        self.seen += keys
        for key in keys:
            assert sum(isinstance(s, Image) for s in self.answers[key]) <= max_images
        return SimpleNamespace(segments=[list(self.answers[k]) for k in keys])


class KilledAfter:
    """Passes `k` calls through to `pipe`, then 'dies' as an interrupted process would."""

    def __init__(self, pipe, k: int):
        self.pipe, self.k, self.calls = pipe, k, 0

    def __call__(self, prompts, **kwargs):
        if self.calls == self.k:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.pipe(prompts, **kwargs)


def result_ids(out_dir) -> list[str]:
    return [json.loads(line)["id"] for line in (out_dir / "results.jsonl").read_text().splitlines()]


def test_an_oracle_scores_one_on_every_category(tmp_path):
    oracle = Oracle(seed=3, n=2)
    summary = run_shapesbench(oracle, n=2, seed=3, out_dir=tmp_path, progress=False)
    scores = {k: v for k, v in summary.items() if k != "n"}
    assert set(REQUIRED) <= scores.keys()
    assert scores == {k: 1.0 for k in scores}, {k: v for k, v in scores.items() if v != 1.0}
    assert len(oracle.seen) == 2 * N_CATEGORIES
    assert all(summary["n"][c] == 2 for c in TASKS["t2i"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["scores"]["correct"] == 1.0 for r in rows)
    t2i = next(r for r in rows if r["task"] == "t2i")
    image = t2i["output"][0]["content"]
    assert (tmp_path / image).is_file() and f"![image]({image})" in t2i["answer"]
    i2t = next(r for r in rows if r["task"] == "i2t")
    assert i2t["prompt"].startswith("![image](images/") and i2t["answer"] == i2t["reference"]


def test_a_wrong_answer_scores_zero(tmp_path):
    oracle = Oracle(seed=3, n=2)
    wrong = {k: [Text(" purple.")] for k in oracle.answers}
    oracle.answers = wrong
    summary = run_shapesbench(oracle, n=2, seed=3, categories=["t2i", "i2t"], progress=False)
    assert summary["t2i_overall"] == 0.0 and summary["image_to_text"] == 0.0
    assert "story_structure" not in summary and "edit" not in summary


def test_position_direction_exposes_a_model_that_draws_every_relation_the_wrong_way_round(tmp_path):
    """Position images are also read for which way they put the relation: the oracle scores 1.0, and one that
    draws every position scene mirrored (the relation reversed, the objects right) scores 0.0 on position and
    on position_direction, counted over every position image."""
    n = 6
    oracle = Oracle(seed=3, n=n)
    truth = run_shapesbench(oracle, n=n, seed=3, categories=["t2i"], progress=False)
    assert truth["position_direction"] == 1.0 and truth["n"]["position_direction"] == n
    for sample in bench_samples(3, n):
        if sample.category == "position":
            scene = Scene.from_dicts(sample.spec["scene"])
            mirrored = Scene(tuple(Obj(o.shape, o.color, o.size, 1 - o.x, 1 - o.y) for o in scene.objects))
            oracle.answers[prompt_key(sample.prompt)] = [Image(render(mirrored))]
    reversed_ = run_shapesbench(oracle, n=n, seed=3, categories=["t2i"], out_dir=tmp_path, progress=False)
    assert reversed_["position"] == reversed_["position_direction"] == 0.0
    assert reversed_["n"]["position_direction"] == n and reversed_["colors"] == 1.0
    assert "position_direction" in (tmp_path / "report.md").read_text()


def test_answer_types_expose_a_model_that_says_yes_to_every_yes_no_question():
    """Questions are also scored by answer type across categories: a model that answers "yes." to every
    question scores on yes/no exactly the share of questions whose answer is yes, while the oracle scores
    1.0 on every type."""
    n = 40
    oracle = Oracle(seed=3, n=n)
    truth = run_shapesbench(oracle, n=n, seed=3, categories=["i2t"], progress=False)
    assert truth["answers_yes_no"] == truth["answers_number"] == truth["answers_other"] == 1.0
    presence = [s for s in bench_samples(3, n) if s.task == "i2t" and s.spec.get("kind") == "presence"]
    assert truth["n"]["answers_yes_no"] == len(presence) > 0
    assert truth["n"]["answers_number"] == n and "caption" not in [k[len("answers_"):] for k in truth["n"]]
    assert sum(truth["n"][f"answers_{t}"] for t in ("yes_no", "number", "other")) == 4 * n  # captions left out
    oracle.answers = {k: [Text(" yes.")] for k in oracle.answers}
    yes = run_shapesbench(oracle, n=n, seed=3, categories=["i2t"], progress=False)
    share = sum(s.spec["answer"] == "yes." for s in presence) / len(presence)
    assert 0 < share < 1 and yes["answers_yes_no"] == pytest.approx(share)
    assert yes["answers_number"] == yes["answers_other"] == 0.0


def test_tiny_pipeline_run_gives_every_score_in_range_and_a_report(make_pipeline, tmp_path):
    pipe = make_pipeline("llama", image_scale=6.0)
    summary = run_shapesbench(pipe, n=2, seed=0, out_dir=tmp_path, progress=False, num_inference_steps=2)
    for key in REQUIRED + ("edit", "caption", "count_qa"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert sum(summary["n"][c] for c in TASKS["t2i"]) == 12
    assert len(result_ids(tmp_path)) == 2 * N_CATEGORIES
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    report = (tmp_path / "report.md").read_text()
    assert "## ShapesBench summary" in report and "| t2i_overall |" in report
    assert "scores.png" in report and (tmp_path / "scores.png").is_file()
    assert list((tmp_path / "images").glob("*.png")), "prompt and answer images are saved"


def test_an_interrupted_run_resumes_with_exactly_one_row_per_sample(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_shapesbench(KilledAfter(Oracle(1, 2), k=3), n=2, seed=1, batch_size=4, out_dir=tmp_path, progress=False)
    first = result_ids(tmp_path)
    assert 0 < len(first) < 2 * N_CATEGORIES

    again = Oracle(1, 2)
    summary = run_shapesbench(again, n=2, seed=1, batch_size=4, out_dir=tmp_path, progress=False)
    ids = result_ids(tmp_path)
    assert len(ids) == len(set(ids)) == 2 * N_CATEGORIES
    assert ids[: len(first)] == first, "finished rows are kept as they were"
    assert len(again.seen) == 2 * N_CATEGORIES - len(first), "finished samples are not generated again"
    assert summary["t2i_overall"] == 1.0

    rerun = Oracle(1, 2)
    run_shapesbench(rerun, n=2, seed=1, out_dir=tmp_path, progress=False)
    assert rerun.seen == [] and len(result_ids(tmp_path)) == 2 * N_CATEGORIES


def test_a_folder_refuses_a_rerun_with_other_settings(tmp_path):
    run_shapesbench(Oracle(1, 1), n=1, seed=1, categories=["colors"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_shapesbench(Oracle(2, 1), n=1, seed=2, categories=["colors"], out_dir=tmp_path, progress=False)


def oracle_with_default_steps(steps: int) -> Oracle:
    """An oracle whose call has a `num_inference_steps` default, as the pipeline's has."""

    class WithDefault(Oracle):
        def __call__(self, prompts, max_new_tokens, max_images, generator, output_type, num_inference_steps=steps,
                     **kwargs):
            return super().__call__(prompts, max_new_tokens, max_images, generator, output_type, **kwargs)

    return WithDefault(1, 1)


def test_a_folder_records_the_pipeline_defaults_it_ran_with(tmp_path):
    run_shapesbench(oracle_with_default_steps(25), n=1, seed=1, categories=["colors"], out_dir=tmp_path,
                    progress=False)
    assert json.loads((tmp_path / "settings.json").read_text())["generation"]["num_inference_steps"] == 25
    # Giving the default explicitly is the same run ...
    run_shapesbench(oracle_with_default_steps(25), n=1, seed=1, categories=["colors"], out_dir=tmp_path,
                    progress=False, num_inference_steps=25)
    # ... but a pipeline whose default has changed does not resume it silently.
    with pytest.raises(ValueError, match="other settings"):
        run_shapesbench(oracle_with_default_steps(30), n=1, seed=1, categories=["colors"], out_dir=tmp_path,
                        progress=False)


def test_a_folder_does_not_resume_under_another_sampler(tmp_path):
    def oracle(stochastic: bool) -> Oracle:
        model = Oracle(1, 1)
        model.scheduler = SimpleNamespace(config={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                                  "stochastic_sampling": stochastic})
        return model

    run_shapesbench(oracle(True), n=1, seed=1, categories=["colors"], out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "settings.json").read_text())["generation"]["scheduler"] == {
        "shift": 3.0, "stochastic_sampling": True}
    with pytest.raises(ValueError, match="other settings"):
        run_shapesbench(oracle(False), n=1, seed=1, categories=["colors"], out_dir=tmp_path, progress=False)


def test_categories_accept_task_names_and_refuse_unknown_ones():
    assert resolve_categories(["story", "colors"]) == ["colors", "given", "free"]
    with pytest.raises(ValueError, match="unknown ShapesBench category 'colour'"):
        resolve_categories(["colour"])


def test_bad_arguments_are_refused_clearly():
    oracle = Oracle(0, 1)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        run_shapesbench(oracle, n=0)
    with pytest.raises(ValueError, match="batch_size"):
        run_shapesbench(oracle, n=1, batch_size=0)
    with pytest.raises(ValueError, match="sets max_images itself"):
        run_shapesbench(oracle, n=1, max_images=3)


def test_summary_table_lists_headline_scores_first():
    table = format_summary({"colors": 0.5, "t2i_overall": 0.25, "n": {"colors": 2, "t2i_overall": 2}})
    lines = table.splitlines()
    assert lines[2] == "| t2i_overall | 0.250 | 2 |" and lines[3] == "| colors | 0.500 | 2 |"


def test_only_a_complete_run_with_the_default_settings_goes_into_the_model_card(make_pipeline, tmp_path, capsys):
    from mmgen.evals.shapesbench import main
    from mmgen.model_card import write_model_card

    model = tmp_path / "model"
    make_pipeline("llama", image_scale=6.0).save_pretrained(model)
    base = ["--model", str(model), "--n", "1", "--seed", "5", "--no-progress", "--save-to-model"]
    assert main([*base, "-o", str(tmp_path / "run")]) == 2
    assert "it is not a folder `mmgen train` exported" in capsys.readouterr().err
    (model / "training_state.json").write_text(json.dumps({"step": 12, "seed": 0, "recipe": "configs/tiny.yaml"}))
    write_model_card(model, [], "configs/tiny.yaml", 12)
    assert main([*base, "-o", str(tmp_path / "run"), "--categories", "t2i"]) == 2
    assert "needs every category" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "run"), "--steps", "2"]) == 2
    assert "needs the default generation settings" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (model / "shapesbench.json").exists(), "refused before the run"

    assert main([*base, "-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert json.loads((model / "shapesbench.json").read_text()) == {"step": 12, "seed": 5, **summary}
    card = (model / "README.md").read_text()
    assert "`mmgen train configs/tiny.yaml`" in card and "measured at step 12 (seed 5)" in card
    assert f"| t2i_overall | {summary['t2i_overall']:.3f} | 6 |" in card
