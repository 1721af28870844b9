"""`mmgen bench`: the generation-loop cases run end to end and write one JSON object per case."""

from __future__ import annotations

import json
import math

import pytest

from mmgen.evals.bench import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from .conftest import tiny_pipeline

    folder = tmp_path_factory.mktemp("bench_model")
    tiny_pipeline(tokenizer, "llama", image_scale=5.0).save_pretrained(folder)
    return folder


def test_story_image_and_batch_cases_write_their_ratios(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["story", "image", "batch", "--quick", "--repeats", "1", "--model", str(model_dir),
                 "--json", str(out), "-o", str(tmp_path / "artefacts")])
    assert code == 0
    results = {r["case"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"story", "image", "batch"}
    ratios = {k: v for r in results.values() for k, v in r["ratios"].items()}
    assert set(ratios) == {"story_vs_reforward", "image_ctx16_vs_ctx0_ours", "image_ctx16_vs_ctx0_in_backbone",
                           "batch8_vs_batch1_throughput", "batch8_vs_batch1_text_throughput"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert {row["context_images"] for row in results["image"]["rows"]} == {0, 16}
    # The context ratios compare the same guidance branches; image guidance is reported on its own row.
    assert {(row["guidance"], row["context_images"]) for row in results["image"]["rows"]} == {
        ("text", 0), ("text", 16), ("text + image", 16)}
    printed = capsys.readouterr().out
    assert "story_vs_reforward" in printed and f"wrote {out}" in printed


def test_the_precision_case_runs_both_dtypes_from_a_bfloat16_pipeline_too(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["precision", "--quick", "--repeats", "1", "--model", str(model_dir), "--dtype", "bfloat16",
                 "--json", str(out), "-o", str(tmp_path / "artefacts")]) == 0
    (result,) = json.loads(out.read_text())
    assert [row["dtype"] for row in result["rows"]] == ["float32", "bfloat16"]
    assert set(result["ratios"]) == {"bf16_vs_fp32_images_batch8", "bf16_vs_fp32_images_batch1",
                                     "bf16_vs_fp32_text_tokens", "bf16_autocast_vs_fp32_train_step"}
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())


def test_an_unknown_case_is_named(model_dir):
    with pytest.raises(ValueError, match="unknown bench case.*nonsense"):
        main(["nonsense", "--model", str(model_dir)])
