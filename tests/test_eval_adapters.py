"""Benchmark adapters: each reads its benchmark's schema, writes predictions in the layout the
benchmark's own scripts read, and reads them back unchanged."""

import json

import PIL.Image
import pytest

from mmgen.evals.adapters import (
    ADAPTERS,
    PlaceholderAdapter,
    get_adapter,
    parse_placeholders,
    render_placeholders,
)
from mmgen.evals.format import EvalSample, Prediction, segments_from_json, segments_to_json
from mmgen.segments import Image, Text

RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 10)


def png(path, color, size=(16, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return PIL.Image.new("RGB", size, color)


def pixels_equal(image_segment, pil):
    return image_segment.image.size == pil.size and image_segment.image.tobytes() == pil.tobytes()


def answer(color_a, color_b):
    return [
        Text("First the circle."),
        Image(PIL.Image.new("RGB", (8, 8), color_a)),
        Text("Then the square."),
        Image(PIL.Image.new("RGB", (8, 8), color_b)),
    ]


def round_trip(adapter, samples, tmp_path):
    predictions = [
        Prediction(samples[0].id, answer(RED, BLUE)),
        Prediction(samples[1].id, [Text("Only text.")]),
    ]
    out = tmp_path / "out"
    adapter.write_predictions(samples, predictions, out)
    assert adapter.read_predictions(out) == predictions
    return out


def test_common_format_round_trips_segments_through_json_and_png_files(tmp_path):
    segments = answer(GREEN, YELLOW)
    items = segments_to_json(segments, tmp_path, "images/s1_o")
    assert [i["type"] for i in items] == ["text", "image", "text", "image"]
    assert items[1]["content"] == "images/s1_o0.png" and (tmp_path / "images/s1_o0.png").is_file()
    assert segments_from_json(json.loads(json.dumps(items)), tmp_path, "s1") == segments


def test_common_format_rejects_unknown_item_types_naming_the_sample(tmp_path):
    with pytest.raises(ValueError, match="s9.*unknown type 'video'"):
        segments_from_json([{"type": "video", "content": "x.mp4"}], tmp_path, "s9")


def test_isg_reads_query_and_golden_and_writes_rows_plus_output(tmp_path):
    data = tmp_path / "isg"
    q = png(data / "images/0000_q1.png", RED)
    g1, g2 = png(data / "images/0000_g1.png", GREEN), png(data / "images/0000_g2.png", BLUE)
    rows = [
        {
            "id": "0000",
            "Category": "Prediction",
            "Query": [
                {"type": "text", "content": "What happens next?"},
                {"type": "image", "content": "images/0000_q1.png"},
            ],
            "Golden": [
                {"type": "text", "content": "The hands get rinsed."},
                {"type": "image", "content": "images/0000_g1.png"},
                {"type": "image", "content": "images/0000_g2.png"},
            ],
        },
        {
            "id": "0001",
            "Category": "Style",
            "Query": [{"type": "text", "content": "Draw a cat."}],
            "Golden": [],
        },
    ]
    (data / "ISG-Bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    adapter = get_adapter("isg")
    samples = adapter.read(data / "ISG-Bench.jsonl")
    assert [s.id for s in samples] == ["0000", "0001"]
    assert samples[0].category == "Prediction"
    assert samples[0].query[0] == Text("What happens next?") and pixels_equal(samples[0].query[1], q)
    assert [type(s) for s in samples[0].golden] == [Text, Image, Image]
    assert pixels_equal(samples[0].golden[1], g1) and pixels_equal(samples[0].golden[2], g2)

    out = round_trip(adapter, samples, tmp_path)
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert written[0]["Query"] == rows[0]["Query"] and written[0]["Category"] == "Prediction"
    assert [i["type"] for i in written[0]["output"]] == ["text", "image", "text", "image"]
    assert all((out / i["content"]).is_file() for i in written[0]["output"] if i["type"] == "image")


def test_opening_reads_conversations_and_writes_one_json_per_total_uid(tmp_path):
    data = tmp_path / "OpenING-benchmark"
    i1 = png(data / "images/Story/96-i-1.jpg", RED)
    png(data / "images/Story/96-o-1.jpg", GREEN)
    rows = [
        {
            "total_uid": "0301096",
            "subtask_name": "Storybook Completion",
            "conversations": [
                {
                    "input": [
                        {
                            "text": "Complete the story. <BEGIN> George looks at the stars. <image>",
                            "image": "./images/Story/96-i-1.jpg",
                        }
                    ]
                },
                {"output": [{"text": "He finds a bird. <image>", "image": "./images/Story/96-o-1.jpg"}]},
            ],
        },
        {
            "total_uid": "1502010",
            "subtask_name": "Brainstorming",
            "conversations": [
                {"input": [{"text": "<BEGIN> Explain gradients.", "image": None}]},
                {"output": []},
            ],
        },
    ]
    (data / "test_data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    adapter = get_adapter("opening")
    samples = adapter.read(data / "test_data.jsonl")
    assert samples[0].id == "0301096" and samples[0].category == "Storybook Completion"
    assert samples[0].query[0] == Text("Complete the story. George looks at the stars.")
    assert pixels_equal(samples[0].query[1], i1)
    assert samples[0].golden[0] == Text("He finds a bird.") and isinstance(samples[0].golden[1], Image)
    assert samples[1].golden is None

    out = round_trip(adapter, samples, tmp_path)
    written = json.loads((out / "0301096.json").read_text())
    assert written["conversations"][0] == rows[0]["conversations"][0]  # the input turn is kept as given
    assert written["conversations"][1]["output"] == [
        {"text": "First the circle.", "image": "0301096-o-0.png"},
        {"text": "Then the square.", "image": "0301096-o-1.png"},
    ]
    assert (out / "0301096-o-1.png").is_file()


def test_opening_predictions_find_images_by_file_name_like_its_scorer(tmp_path):
    out = tmp_path / "Show-o_output"
    img = png(out / "42-o-0.png", YELLOW)
    row = {
        "conversations": [
            {"input": []},
            {"output": [{"text": "A bird.", "image": "./Show-o_output/42-o-0.png"}]},
        ]
    }
    (out / "42.json").write_text(json.dumps(row))
    (pred,) = get_adapter("opening").read_predictions(out)
    assert pred.id == "42" and pred.output[0] == Text("A bird.") and pixels_equal(pred.output[1], img)


def test_mmie_writes_a_self_contained_folder_for_its_scorer(tmp_path):
    data = tmp_path / "mmie"
    q = png(data / "images/0.png", RED)
    png(data / "images/1.png", GREEN)
    rows = [
        {
            "id": "PBL_12",
            "question": [
                {"text": "Plan the project.", "image": None},
                {"text": "Use this sketch.", "image": "images/0.png"},
            ],
            "answer": [],
            "model": "gt",
            "gt_answer": [{"text": "Step one.", "image": "images/1.png"}],
        },
        {
            "id": "SA_3",
            "question": [{"text": "Which is safe?", "image": None}],
            "answer": "",
            "gt_answer": [{"text": "B", "image": None}],
        },
    ]
    (data / "data.json").write_text(json.dumps(rows))

    adapter = get_adapter("mmie")
    samples = adapter.read(data / "data.json")
    assert [s.category for s in samples] == ["PBL", "SA"]
    assert samples[0].query[:2] == [Text("Plan the project."), Text("Use this sketch.")]
    assert pixels_equal(samples[0].query[2], q)
    assert samples[1].golden == [Text("B")]

    out = round_trip(adapter, samples, tmp_path)
    written = json.loads((out / "data.json").read_text())
    assert written[0]["model"] == "mmgen" and written[0]["gt_answer"][0]["text"] == "Step one."
    for row in written:  # every image path resolves against the folder of data.json, as MMIE's scorer expects
        for key in ("question", "answer", "gt_answer"):
            assert all((out / item["image"]).is_file() for item in row[key] if item["image"])


def test_llm_i_keeps_criteria_and_places_input_images_at_their_slots(tmp_path):
    data = tmp_path / "llmi"
    a, b = png(data / "a.png", RED), png(data / "b.png", BLUE)
    rows = [
        {
            "prompt": "Compare <image> with <image> in a short report.",
            "images": ["a.png", "b.png"],
            "r1": "Mentions colour",
            "r2": "Has a chart",
            "r10": "Is short",
        },
        {"prompt": "Write about owls with pictures.", "images": [], "r1": "Shows an owl"},
    ]
    (data / "bench.json").write_text(json.dumps(rows))

    adapter = get_adapter("llm-i")
    samples = adapter.read(data / "bench.json")
    assert [s.id for s in samples] == ["1", "2"]
    assert samples[0].meta["criteria"] == ["Mentions colour", "Has a chart", "Is short"]
    q = samples[0].query
    assert (
        q[0] == Text("Compare ")
        and pixels_equal(q[1], a)
        and q[2] == Text(" with ")
        and pixels_equal(q[3], b)
    )
    round_trip(adapter, samples, tmp_path)


@pytest.mark.parametrize("style", ["<image>", "<IMAGE>", "markdown"])
def test_placeholder_adapter_round_trips_in_each_style(tmp_path, style):
    data = tmp_path / "ph"
    png(data / "x.png", RED)
    rows = [
        {"id": "a", "prompt": "Continue: ![](IMG#1)", "images": ["x.png"]},
        {
            "id": "b",
            "prompt": "A caption <IMAGE> please",
            "images": ["x.png"],
            "answer": "Sure.",
            "answer_images": [],
        },
    ]
    (data / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    adapter = PlaceholderAdapter(style=style)
    samples = adapter.read(data / "rows.jsonl")
    assert samples[0].query[0] == Text("Continue: ") and isinstance(samples[0].query[1], Image)
    assert samples[1].golden == [Text("Sure.")]
    round_trip(adapter, samples, tmp_path)


def test_placeholders_fill_slots_in_order_or_by_1_based_number():
    x, y = PIL.Image.new("RGB", (4, 4), RED), PIL.Image.new("RGB", (4, 4), BLUE)
    segs = parse_placeholders("see ![](IMG#2) then <image>", [x, y])
    assert (
        segs[0] == Text("see ") and segs[1] == Image(y) and segs[2] == Text(" then ") and segs[3] == Image(x)
    )
    text, images = render_placeholders(segs, "markdown")
    assert text == "see ![](IMG#1) then ![](IMG#2)" and images == [y, x]


def test_placeholders_refuse_a_slot_without_an_image():
    with pytest.raises(ValueError, match="s1.*refers to image 2"):
        parse_placeholders("<image> and <image>", [PIL.Image.new("RGB", (4, 4))], "s1")


@pytest.mark.parametrize(
    "name,file_name,rows",
    [
        ("isg", "d.jsonl", [{"id": "q7", "Query": [{"type": "image", "content": "gone.png"}]}]),
        (
            "opening",
            "d.jsonl",
            [{"total_uid": "q7", "conversations": [{"input": [{"text": "t", "image": "gone.png"}]}]}],
        ),
        ("mmie", "d.json", [{"id": "q7", "question": [{"text": "t", "image": "gone.png"}], "gt_answer": []}]),
        ("llm-i", "d.json", [{"id": "q7", "prompt": "<image>", "images": ["gone.png"]}]),
    ],
)
def test_a_missing_image_names_the_sample_and_the_path(tmp_path, name, file_name, rows):
    path = tmp_path / file_name
    path.write_text(
        "\n".join(json.dumps(r) for r in rows) if file_name.endswith("jsonl") else json.dumps(rows)
    )
    with pytest.raises(ValueError, match=r"'q7'.*gone\.png"):
        get_adapter(name).read(path)


def test_images_resolve_against_images_dir_when_given(tmp_path):
    png(tmp_path / "pics/images/q.png", GREEN)
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "1", "Query": [{"type": "image", "content": "images/q.png"}]}) + "\n"
    )
    (sample,) = get_adapter("isg").read(tmp_path / "d.jsonl", images_dir=tmp_path / "pics")
    assert sample.golden is None and isinstance(sample.query[0], Image)


def test_registry_names_every_benchmark_and_rejects_unknown_ones():
    assert set(ADAPTERS) == {"isg", "opening", "mmie", "llm-i", "placeholder"}
    with pytest.raises(ValueError, match="isg, llm-i, mmie, opening, placeholder"):
        get_adapter("mme")


def test_duplicate_ids_and_foreign_predictions_are_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "1", "Query": []}\n{"id": "1", "Query": []}\n')
    with pytest.raises(ValueError, match="duplicate sample id '1'"):
        get_adapter("isg").read(tmp_path / "d.jsonl")
    sample = EvalSample("1", [Text("q")])
    with pytest.raises(ValueError, match="unknown sample id '2'"):
        get_adapter("isg").write_predictions([sample], [Prediction("2", [])], tmp_path / "o")
