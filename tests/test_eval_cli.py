"""`mmgen eval shapesbench` and `mmgen eval interleaved` through the command line entry point."""

from __future__ import annotations

import json

import PIL.Image
import pytest

from mmgen.cli import main
from mmgen.pipelines import MMGenPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrix products: threads cost more than they save


@pytest.fixture
def isg_data(tmp_path):
    data = tmp_path / "isg"
    (data / "images").mkdir(parents=True)
    PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(data / "images/red.png")
    rows = [
        {
            "id": f"{i:04d}",
            "Category": "Story",
            "Query": [{"type": "image", "content": "images/red.png"}, {"type": "text", "content": f"story {i}."}],
            "Golden": [{"type": "text", "content": "a red square."}, {"type": "image", "content": "images/red.png"}],
        }
        for i in range(2)
    ]
    path = data / "ISG-Bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_eval_shapesbench_writes_summary_and_report(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "shapesbench", "--model", str(model_dir), "--categories", "colors,caption", "given",
                 "--n", "1", "--steps", "2", "--seed", "5", "--no-progress", "-o", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("colors", "t2i_overall", "caption", "image_to_text", "story_structure", "story_consistency"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert "single_object" not in summary and "edit" not in summary, "categories not run are left out"
    assert summary["n"] == {"colors": 1, "t2i_overall": 1, "caption": 1, "image_to_text": 1, "story_given": 1,
                            "story_structure": 1, "story_consistency": 1}
    assert (out / "report.md").is_file()
    printed = capsys.readouterr().out
    assert "| t2i_overall |" in printed and f"report: {out / 'report.md'}" in printed


def test_eval_shapesbench_with_a_missing_model_folder_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code = main(["eval", "shapesbench", "--model", str(missing), "--n", "1", "-o", str(tmp_path / "run")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_eval_shapesbench_refuses_an_unknown_category_before_loading(tmp_path, capsys):
    code = main(["eval", "shapesbench", "--model", str(tmp_path / "absent"), "--categories", "colour",
                 "-o", str(tmp_path / "run")])
    assert code == 2 and "unknown ShapesBench category 'colour'" in capsys.readouterr().err


def test_eval_interleaved_generates_then_resumes_without_loading_the_model(model_dir, isg_data, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["eval", "interleaved", "--benchmark", "isg", "--data", str(isg_data), "--model", str(model_dir),
            "--steps", "2", "--max-new-tokens", "8", "--max-images", "1", "-o", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0000", "0001"] and all(r["status"] == "ok" for r in rows)
    assert (out / "summary.json").is_file() and (out / "predictions" / "predictions.jsonl").is_file()
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(MMGenPipeline, "from_pretrained", refuse)
    assert main(args) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_eval_interleaved_scores_predictions_without_a_model(isg_data, tmp_path):
    predictions = tmp_path / "preds"
    predictions.mkdir()
    (predictions / "predictions.jsonl").write_text(
        json.dumps({"id": "0000", "output": [{"type": "text", "content": "a red square."}]}) + "\n"
    )
    code = main(["eval", "interleaved", "--benchmark", "isg", "--data", str(isg_data), "--model",
                 str(tmp_path / "absent"), "--predictions", str(predictions), "-o", str(tmp_path / "run")])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0000"]


def test_eval_interleaved_with_a_missing_model_folder_exits_2_naming_it(isg_data, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code = main(["eval", "interleaved", "--benchmark", "isg", "--data", str(isg_data), "--model", str(missing),
                 "-o", str(tmp_path / "run")])
    assert code == 2 and str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_eval_interleaved_usage_errors_return_2(capsys):
    assert main(["eval", "interleaved", "--data", "x.jsonl"]) == 2
    assert "--benchmark" in capsys.readouterr().err
