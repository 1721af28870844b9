"""The resumable runner: one row per sample however often a run is killed and restarted, summaries
and reports, scoring of existing predictions, and the one-call benchmark evaluation."""

import json
import logging
from dataclasses import dataclass

import PIL.Image
import pytest

from mmgen.evals.adapters import get_adapter
from mmgen.evals.format import EvalSample, Prediction
from mmgen.evals.interleaved import InterleavedEvalConfig, evaluate_interleaved
from mmgen.evals.metrics import ReferenceScorer
from mmgen.evals.runner import ResultsLog, run_eval, score_predictions, summarize
from mmgen.segments import Image, Text


def picture(i):
    return PIL.Image.new("RGB", (16, 16), ((40 * i) % 256, 100, 200 - 20 * i))


def make_samples(n, category=lambda i: "even" if i % 2 == 0 else "odd"):
    return [
        EvalSample(
            f"s{i}",
            [Text(f"draw shape {i}")],
            golden=[Text(f"shape {i}"), Image(picture(i))],
            meta={"category": category(i)},
        )
        for i in range(n)
    ]


def answer_of(query):
    i = int(query[0].text.split()[-1])
    return [Text(f"shape {i}"), Image(picture(i))]


class KilledAfter:
    """A generate_fn whose process 'dies' (raises) once it has produced k outputs."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, query):
        if self.calls == self.k:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return answer_of(query)


class Counting:
    def __init__(self):
        self.seen = []

    def __call__(self, query):
        self.seen.append(query[0].text)
        return answer_of(query)


def result_lines(out_dir):
    return (out_dir / "results.jsonl").read_text().splitlines()


def ids_in(out_dir):
    return [json.loads(line)["id"] for line in result_lines(out_dir)]


SCORERS = [ReferenceScorer(image_size=16)]


def test_a_killed_run_resumes_without_losing_or_duplicating_rows(tmp_path):
    samples = make_samples(6)
    with pytest.raises(KeyboardInterrupt):
        run_eval(samples, KilledAfter(3), tmp_path, SCORERS, progress=False)
    first = result_lines(tmp_path)
    assert ids_in(tmp_path) == ["s0", "s1", "s2"]

    again = Counting()
    run = run_eval(samples, again, tmp_path, SCORERS, progress=False)
    assert again.seen == ["draw shape 3", "draw shape 4", "draw shape 5"]  # finished ids are skipped
    assert sorted(ids_in(tmp_path)) == [s.id for s in samples]  # exactly one row per id
    assert result_lines(tmp_path)[:3] == first  # finished rows are untouched
    assert run.summary["n_done"] == 6 and run.summary["metrics"]["structure_match"]["mean"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text()) == run.summary

    third = Counting()
    run_eval(samples, third, tmp_path, SCORERS, progress=False)
    assert third.seen == [] and len(result_lines(tmp_path)) == 6


def test_a_torn_last_line_is_dropped_and_that_sample_is_done_again(tmp_path, caplog):
    samples = make_samples(4)
    run_eval(samples, answer_of, tmp_path, SCORERS, progress=False, report=False)
    lines = result_lines(tmp_path)
    # the process died half-way through writing the last row
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])

    again = Counting()
    with caplog.at_level(logging.WARNING, logger="mmgen.evals.runner"):
        run_eval(samples, again, tmp_path, SCORERS, progress=False, report=False)
    assert "torn last line" in caplog.text
    assert again.seen == ["draw shape 3"]
    redone = result_lines(tmp_path)
    assert redone[:3] == lines[:3] and len(redone) == 4

    def untimed(line):
        return {k: v for k, v in json.loads(line).items() if k != "seconds"}

    assert untimed(redone[3]) == untimed(lines[3])  # the redone row equals the one that was torn


def test_a_corrupt_complete_line_is_an_error_not_silently_dropped(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: corrupt result line"):
        ResultsLog(tmp_path / "results.jsonl")


def test_results_log_appends_durably_and_refuses_duplicate_ids(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    log.append({"id": "a", "x": float("inf")})
    with pytest.raises(ValueError, match="'a' already has a row"):
        log.append({"id": "a"})
    reopened = ResultsLog(tmp_path / "r.jsonl")
    assert reopened.done_ids == {"a"} and reopened.get("a") == {"id": "a", "x": None}  # non-finite -> null
    reopened.append({"id": "b"})
    reopened.drop(["a"])
    assert [r["id"] for r in ResultsLog(tmp_path / "r.jsonl").rows] == ["b"]


def test_recorded_failures_keep_the_run_going_and_can_be_retried(tmp_path):
    samples = make_samples(3)

    def flaky(query):
        if query[0].text.endswith("1"):
            raise RuntimeError("out of memory")
        return answer_of(query)

    run = run_eval(samples, flaky, tmp_path, SCORERS, on_error="record", progress=False, report=False)
    assert run.summary["n_errors"] == 1 and run.summary["n_ok"] == 2
    failed = [json.loads(line) for line in result_lines(tmp_path) if '"s1"' in line][0]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: out of memory"

    again = Counting()
    run_eval(samples, again, tmp_path, SCORERS, on_error="record", progress=False, report=False)
    assert again.seen == []  # error rows count as done unless retried
    run = run_eval(samples, again, tmp_path, SCORERS, retry_errors=True, progress=False, report=False)
    assert again.seen == ["draw shape 1"] and run.summary["n_errors"] == 0
    assert sorted(ids_in(tmp_path)) == ["s0", "s1", "s2"]


def test_a_failing_scorer_is_recorded_per_sample_and_the_others_still_score(tmp_path):
    def broken(sample, output):
        raise ZeroDivisionError("boom")

    run = run_eval(make_samples(2), answer_of, tmp_path, [broken, *SCORERS], progress=False, report=False)
    row = run.rows[0]
    assert row["scorer_errors"] == {"broken": "ZeroDivisionError: boom"} and row["scores"]["rouge_l"] == 1.0
    assert run.summary["scoring_failures"] == {"broken": 2}


def test_outputs_are_saved_as_png_files_next_to_the_results(tmp_path):
    @dataclass
    class PipelineOutput:  # the runner accepts the pipeline's output object as well as a plain list
        segments: list

    run = run_eval(
        make_samples(1), lambda q: PipelineOutput(answer_of(q)), tmp_path, progress=False, report=False
    )
    output = run.rows[0]["output"]
    assert output[0] == {"type": "text", "content": "shape 0"}
    assert output[1]["content"].startswith("images/") and (tmp_path / output[1]["content"]).is_file()


def test_bad_arguments_are_refused_clearly(tmp_path):
    with pytest.raises(TypeError, match="generate_fn must be callable"):
        run_eval(make_samples(1), None, tmp_path)
    with pytest.raises(ValueError, match="on_error must be"):
        run_eval(make_samples(1), answer_of, tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="duplicate sample id 's0'"):
        run_eval(make_samples(1) * 2, answer_of, tmp_path)
    with pytest.raises(TypeError, match="list of segments"):
        run_eval(make_samples(1), lambda q: 42, tmp_path, progress=False)


def test_score_predictions_scores_existing_outputs_and_skips_missing_ones(tmp_path):
    samples = make_samples(3)
    predictions = [Prediction("s0", answer_of(samples[0].query)), Prediction("s2", [Text("no picture")])]
    run = score_predictions(samples, predictions, tmp_path, SCORERS, progress=False)
    assert [r["id"] for r in run.rows] == ["s0", "s2"]
    assert run.summary["n_samples"] == 3 and run.summary["n_done"] == 2
    assert run.summary["metrics"]["structure_match"]["mean"] == 0.5
    assert run.summary["by_category"]["even"]["n"] == 2


def test_summary_averages_numbers_counts_booleans_as_rates_and_skips_missing_values():
    rows = [
        {"id": "a", "status": "ok", "category": "x", "scores": {"m": 1.0, "ok": True, "tau": None}},
        {
            "id": "b",
            "status": "ok",
            "category": "y",
            "scores": {"m": 3.0, "ok": False, "tau": 0.5, "judge.error": "down"},
        },
        {"id": "c", "status": "error", "scores": {}},
    ]
    summary = summarize(rows)
    assert summary["metrics"] == {
        "m": {"mean": 2.0, "n": 2},
        "ok": {"mean": 0.5, "n": 2},
        "tau": {"mean": 0.5, "n": 1},
    }
    assert summary["n_errors"] == 1 and summary["by_category"]["y"]["m"] == 3.0
    assert summary["scoring_failures"] == {"judge.error": 1}


def test_report_has_tables_a_chart_and_example_grids(tmp_path):
    samples = make_samples(6)

    def half_right(query):
        i = int(query[0].text.split()[-1])
        return answer_of(query) if i < 3 else [Image(picture(i)), Text("wrong order")]

    run_eval(samples, half_right, tmp_path, SCORERS, title="Shapes check", progress=False)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Shapes check")
    assert "| structure_match | 0.5 | 6 |" in report and "## By category" in report
    assert "Best: `s0` (True), `s1` (True), `s2` (True)\n" in report and "Worst: `s5` (False)" in report
    for png in ("scores.png", "successes.png", "failures.png"):
        assert (tmp_path / png).is_file() and png in report
        with PIL.Image.open(tmp_path / png) as im:
            assert im.format == "PNG"


def test_evaluate_interleaved_runs_a_benchmark_and_writes_its_official_layout(tmp_path):
    data = tmp_path / "isg"
    (data / "images").mkdir(parents=True)
    picture(1).save(data / "images/g.png")
    rows = [
        {
            "id": f"{i:04d}",
            "Category": "Story",
            "Query": [{"type": "text", "content": f"draw shape {i}"}],
            "Golden": [
                {"type": "text", "content": f"shape {i}"},
                {"type": "image", "content": "images/g.png"},
            ],
        }
        for i in range(1, 4)
    ]
    (data / "ISG-Bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = InterleavedEvalConfig(
        benchmark="isg", data=str(data / "ISG-Bench.jsonl"), out_dir=str(tmp_path / "run"), limit=2
    )
    run = evaluate_interleaved(config, answer_of)
    assert [r["id"] for r in run.rows] == ["0001", "0002"]
    assert run.rows[0]["scores"]["ssim"] == pytest.approx(1.0)
    preds = get_adapter("isg").read_predictions(tmp_path / "run" / "predictions")
    assert [p.id for p in preds] == ["0001", "0002"] and preds[0].output == answer_of([Text("draw shape 1")])

    rescored = evaluate_interleaved(
        InterleavedEvalConfig(
            benchmark="isg",
            data=config.data,
            out_dir=str(tmp_path / "rescored"),
            predictions_dir=str(tmp_path / "run" / "predictions"),
        )
    )
    assert [r["id"] for r in rescored.rows] == ["0001", "0002"]
    assert rescored.rows[0]["scores"] == run.rows[0]["scores"]


def test_interleaved_config_refuses_half_given_options():
    with pytest.raises(ValueError, match="known benchmarks"):
        InterleavedEvalConfig(benchmark="nope", data="d", out_dir="o")
    with pytest.raises(ValueError, match="judge_url and judge_model"):
        InterleavedEvalConfig(benchmark="isg", data="d", out_dir="o", judge_url="http://x")
    with pytest.raises(ValueError, match="clip_checkpoint and clip_arch"):
        InterleavedEvalConfig(benchmark="isg", data="d", out_dir="o", clip_arch="ViT-B-32")


def test_an_output_that_cannot_be_saved_is_a_sample_failure(tmp_path):
    import torch

    run = run_eval(
        make_samples(1),
        lambda q: [Image(latent=torch.zeros(4, 2, 2))],
        tmp_path,
        SCORERS,
        on_error="record",
        progress=False,
        report=False,
    )
    assert run.rows[0]["status"] == "error" and "latent" in run.rows[0]["error"]
