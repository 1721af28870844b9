"""Specification of ShapesWorld: scenes, rendering, language and the task sampler."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from mmgen.segments import Image, Text
from mmgen.shapesworld import (
    BACKGROUND,
    RELATIONS,
    SHAPES,
    TASKS,
    Change,
    Obj,
    ObjSpec,
    Scene,
    ShapesWorld,
    caption,
    change_sentence,
    is_clear,
    parse_caption,
    parse_change,
    random_change,
    random_scene,
    relation,
    render,
    spec_matches,
)
from mmgen.shapesworld import language as lang
from mmgen.shapesworld.render import patch_shapes
from mmgen.shapesworld.scene import EDGE_MARGIN, MIN_GAP, PALETTE

ALL_CATEGORIES = [c for cats in TASKS.values() for c in cats]


# -- scenes ------------------------------------------------------------------------------------


def test_relation_follows_the_dominant_axis_with_y_pointing_down():
    a = Obj("circle", "red", "small", 0.2, 0.5)
    b = Obj("square", "blue", "small", 0.8, 0.6)
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    top = Obj("circle", "red", "small", 0.5, 0.1)
    bottom = Obj("square", "blue", "small", 0.45, 0.9)
    assert relation(top, bottom) == "above" and relation(bottom, top) == "below"
    assert is_clear(top, bottom) and not is_clear(Obj("star", "red", "small", 0.3, 0.3), Obj("star", "blue", "small", 0.5, 0.45))


def test_random_scenes_are_valid_separated_and_two_object_relations_are_clear():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        assert 1 <= len(scene) <= 4
        pairs = {(o.shape, o.color) for o in scene.objects}
        assert len(pairs) == len(scene), "every (shape, colour) pair is unique within a scene"
        for o in scene.objects:
            assert EDGE_MARGIN <= o.x - o.radius and o.x + o.radius <= 1 - EDGE_MARGIN + 1e-9
            assert EDGE_MARGIN <= o.y - o.radius and o.y + o.radius <= 1 - EDGE_MARGIN + 1e-9
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                gap = a.radius + b.radius + MIN_GAP
                assert abs(a.x - b.x) >= gap - 1e-9 or abs(a.y - b.y) >= gap - 1e-9
        if len(scene) == 2:
            assert is_clear(*scene.objects)


def test_random_scene_honours_specs_and_relations():
    rng = random.Random(1)
    for rel in RELATIONS:
        scene = random_scene(rng, specs=[ObjSpec("square", "blue"), ObjSpec("circle", "red", "large")], relations=[(1, rel, 0)])
        square, circle = scene.objects
        assert (square.shape, square.color) == ("square", "blue")
        assert (circle.shape, circle.color, circle.size) == ("circle", "red", "large")
        assert relation(circle, square) == rel and is_clear(circle, square)


def test_scene_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        Obj("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="color"):
        Obj("circle", "pink", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="x"):
        Obj("circle", "red", "small", 1.5, 0.5)
    with pytest.raises(ValueError, match="n_objects"):
        random_scene(random.Random(0), n_objects=7)
    with pytest.raises(TypeError):
        random_scene(0)


def test_changes_apply_as_described():
    rng = random.Random(2)
    circle, square = Obj("circle", "red", "small", 0.2, 0.25), Obj("square", "blue", "small", 0.5, 0.5)
    scene = Scene((circle, square))

    recolored = Change("recolor", ObjSpec("circle"), color="green").apply(scene, rng)
    assert recolored.objects[0] == Obj("circle", "green", circle.size, circle.x, circle.y)
    assert recolored.objects[1] == square

    removed = Change("remove", ObjSpec("square")).apply(scene, rng)
    assert removed.objects == (circle,)

    added = Change("add", ObjSpec("star", "yellow"), relation="below", anchor=ObjSpec("circle")).apply(scene, rng)
    assert added.objects[:2] == scene.objects
    assert relation(added.objects[2], circle) == "below" and added.objects[2].color == "yellow"

    current = relation(circle, square)
    new_rel = next(r for r in RELATIONS if r != current)
    moved = Change("move", ObjSpec("circle"), relation=new_rel, anchor=ObjSpec("square")).apply(scene, rng)
    assert relation(moved.objects[0], square) == new_rel and moved.objects[1] == square

    with pytest.raises(ValueError, match="refers to 0 objects"):
        Change("remove", ObjSpec("triangle")).apply(scene, rng)


def test_change_and_spec_dicts_round_trip_through_json():
    rng = random.Random(3)
    for _ in range(100):
        scene = random_scene(rng)
        change = random_change(rng, scene)
        assert Change.from_dict(json.loads(json.dumps(change.to_dict()))) == change
        assert Scene.from_dicts(json.loads(json.dumps(scene.to_dicts()))) == scene


# -- rendering ---------------------------------------------------------------------------------


def test_render_is_deterministic_antialiased_and_sized():
    scene = random_scene(random.Random(4), n_objects=3)
    a, b = render(scene), render(scene)
    assert a.mode == "RGB" and a.size == (64, 64)
    assert a.tobytes() == b.tobytes()
    pixels = np.asarray(a).reshape(-1, 3)
    assert tuple(pixels[0]) == BACKGROUND
    distinct = {tuple(p) for p in pixels}
    assert len(distinct) > len(scene) + 1, "soft edges blend object colours into the background"
    assert render(scene, size=128).size == (128, 128)


def test_every_shape_renders_with_a_distinct_footprint():
    masks = {}
    for shape in SHAPES:
        img = np.asarray(render(Scene((Obj(shape, "blue", "large", 0.5, 0.5),))))
        masks[shape] = (np.abs(img.astype(int) - BACKGROUND).sum(-1) > 100)
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 < s2:
                inter = (masks[s1] & masks[s2]).sum()
                union = (masks[s1] | masks[s2]).sum()
                assert inter / union < 0.85, f"{s1} and {s2} look too alike"


def test_patch_shapes_name_the_shape_each_cell_of_the_picture_shows():
    def share(pixels, rgb):
        return (np.abs(pixels - rgb).sum(-1) < 40).mean()

    square = 1 + SHAPES.index("square")
    cells = patch_shapes(Scene((Obj("square", "red", "large", 0.5, 0.5),)), 8).reshape(8, 8)
    assert (cells[3:5, 3:5] == square).all() and cells[0, 0] == 0 and set(cells.ravel()) == {0, square}
    for seed in range(20):
        scene = random_scene(random.Random(seed))
        image = np.asarray(render(scene)).astype(int)
        cells = patch_shapes(scene, 8).reshape(8, 8)
        for i in range(8):
            for j in range(8):
                pixels = image[8 * i: 8 * i + 8, 8 * j: 8 * j + 8].reshape(-1, 3)
                if cells[i, j]:
                    named = [o for o in scene.objects if 1 + SHAPES.index(o.shape) == cells[i, j]]
                    assert max(share(pixels, PALETTE[o.color]) for o in named) > 0.05, (seed, i, j)
                else:
                    assert share(pixels, BACKGROUND) > 0.5, (seed, i, j)
    with pytest.raises(ValueError, match="into a 7 x 7 grid"):
        patch_shapes(scene, 7)


# -- language ----------------------------------------------------------------------------------


def test_captions_read_back_to_the_scene_for_many_draws():
    rng = random.Random(5)
    for _ in range(2000):
        scene = random_scene(rng)
        text = caption(scene, rng)
        assert text == text.lower() and text.endswith(".")
        assert spec_matches(scene.objects, parse_caption(text)), text


def test_canonical_caption_states_the_relation_of_two_objects():
    scene = Scene((Obj("square", "blue", "small", 0.75, 0.5), Obj("circle", "red", "small", 0.25, 0.5)))
    assert caption(scene) == "a red circle left of a blue square."
    spec = parse_caption("there is an orange star to the right of a large green circle.")
    assert [(o.shape, o.color, o.size) for o in spec.objects] == [("star", "orange", None), ("circle", "green", "large")]
    assert spec.relations == ((0, "right of", 1),)
    counted = parse_caption("draw three triangles.")
    assert [o.shape for o in counted.objects] == ["triangle"] * 3


def test_change_sentences_read_back_for_many_draws():
    rng = random.Random(6)
    for _ in range(2000):
        scene = random_scene(rng)
        change = random_change(rng, scene)
        for imperative in (False, True):
            text = change_sentence(change, rng, imperative=imperative)
            assert text.endswith(".") and text == text.lower()
            assert parse_change(text) == change, text
        assert parse_change(lang.story_step(change, rng)) == change


def test_parsers_reject_text_outside_the_world_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("a dog on a skateboard.")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_change("the circle sings a song.")
    with pytest.raises(TypeError):
        parse_caption(None)


def test_answers_normalise_case_digits_articles_and_relation_synonyms():
    assert lang.normalize_answer(" Red.") == lang.normalize_answer("red")
    assert lang.normalize_answer("3") == lang.normalize_answer("three.")
    assert lang.normalize_answer("to the left of the square.") == lang.normalize_answer("left of the square")
    assert lang.normalize_answer("blue.") != lang.normalize_answer("red.")


# -- tasks -------------------------------------------------------------------------------------


def _fingerprint(sample) -> str:
    parts = [sample.task, sample.category, json.dumps(sample.spec, sort_keys=True)]
    for seg in sample.prompt + sample.answer:
        parts.append(seg.text if isinstance(seg, Text) else seg.image.tobytes().hex())
    return "|".join(parts)


def test_same_seed_gives_identical_samples_and_render_bytes():
    a, b = ShapesWorld(seed=11), ShapesWorld(seed=11)
    first = [_fingerprint(a.sample()) for _ in range(40)]
    assert first == [_fingerprint(b.sample()) for _ in range(40)]
    assert first != [_fingerprint(ShapesWorld(seed=12).sample()) for _ in range(40)]
    assert _fingerprint(ShapesWorld(seed=11).sample_at(7)) == first[7], "sample i depends only on (seed, i)"


def _check_well_formed(sample, size: int) -> None:
    assert sample.category in TASKS[sample.task]
    json.dumps(sample.spec)  # JSON-serialisable ground truth
    assert sample.spec["task"] == sample.task and sample.spec["category"] == sample.category
    for k, seg in enumerate(sample.prompt + sample.answer):
        assert isinstance(seg, (Text, Image))
        if isinstance(seg, Image):
            assert seg.image is not None and seg.image.size == (size, size) and seg.image.mode == "RGB"
        else:
            first_of_prompt = k == 0
            assert seg.text.startswith(" ") != first_of_prompt, f"leading-space convention broken: {seg.text!r}"
            assert not seg.text.startswith("  ") and seg.text == seg.text.lower()
            assert "<|" not in seg.text and seg.text.rstrip()[-1] in ".?"
    prompt_text = "".join(s.text for s in sample.prompt if isinstance(s, Text))
    answer_kinds = [type(s) for s in sample.answer]
    if sample.task == "t2i":
        assert [type(s) for s in sample.prompt] == [Text] and answer_kinds == [Image]
        assert spec_matches(Scene.from_dicts(sample.spec["scene"]).objects, parse_caption(prompt_text), exact=False)
    elif sample.task == "i2t":
        assert [type(s) for s in sample.prompt] == [Image, Text] and answer_kinds == [Text]
        assert prompt_text.endswith(("?", "."))
    elif sample.task == "edit":
        assert [type(s) for s in sample.prompt] == [Image, Text] and answer_kinds == [Image]
        assert parse_change(prompt_text) == Change.from_dict(sample.spec["change"])
    else:
        n = len(sample.spec["scenes"])
        assert 2 <= n <= 4 and answer_kinds == [Text, Image] * n
        texts = [s.text.strip() for s in sample.answer if isinstance(s, Text)]
        assert spec_matches(Scene.from_dicts(sample.spec["scenes"][0]).objects, parse_caption(texts[0]))
        for text, change in zip(texts[1:], sample.spec["changes"]):
            assert parse_change(text) == Change.from_dict(change)
    # The images are the renders of the stored scenes.
    scenes = {"t2i": [sample.spec.get("scene")], "edit": [sample.spec.get("target")]}.get(
        sample.task, sample.spec.get("scenes", [])
    )
    images = [s.image for s in sample.answer if isinstance(s, Image)]
    for img, scene in zip(images, scenes):
        assert img.tobytes() == render(Scene.from_dicts(scene), size).tobytes()


@pytest.mark.parametrize("category", ALL_CATEGORIES)
def test_every_task_and_category_yields_well_formed_samples(category):
    world = ShapesWorld(seed=3)
    for _ in range(6):
        sample = world.sample(category=category)
        _check_well_formed(sample, 64)


def test_story_prompts_state_the_steps_and_answers_repeat_them():
    world = ShapesWorld(seed=4)
    sample = world.sample(category="given")
    texts = [s.text.strip() for s in sample.answer if isinstance(s, Text)]
    assert sample.prompt[0].text.endswith(" ".join(texts))
    assert lang.count_word(len(texts)) in sample.prompt[0].text
    free = world.sample(category="free")
    assert free.prompt[0].text.startswith(("tell a story", "make up a story"))


def test_world_size_controls_every_image():
    sample = ShapesWorld(seed=0, size=32).sample(task="edit")
    assert all(s.image.size == (32, 32) for s in sample.prompt + sample.answer if isinstance(s, Image))


def test_stream_is_endless_and_respects_tasks_and_weights():
    world = ShapesWorld(seed=5)
    stream = world.stream(tasks=["i2t", "edit"], weights=[1.0, 0.0])
    tasks = {next(stream).task for _ in range(30)}
    assert tasks == {"i2t"}
    mixed = ShapesWorld(seed=5).stream()
    assert len({next(mixed).task for _ in range(60)}) == 4


def test_category_weights_shift_the_mix_within_a_task_and_leave_unweighted_streams_alone():
    weights = {"position": 5.0, "single_object": 0.0}
    drawn = Counter(ShapesWorld(seed=2).sample_at(i, task="t2i", category_weights=weights).category
                    for i in range(400))
    assert "single_object" not in drawn
    assert drawn["position"] > 0.4 * 400  # 5 of 10 parts, against 1 in 6 unweighted
    plain = [ShapesWorld(seed=2).sample_at(i, task="t2i").category for i in range(40)]
    assert [ShapesWorld(seed=2).sample_at(i, task="t2i", category_weights={}).category for i in range(40)] == plain


def _laid_out_as_read(spec: dict) -> bool:
    """Whether a two-object t2i scene puts the object named first on its side of the centre: the left for
    "A and B", the side its relation names for "A above B" and the like, and the other object opposite."""
    from mmgen.shapesworld.scene import centre_half

    by_shape = {o["shape"]: o for o in spec["scene"]}
    first, second = (by_shape[r["shape"]] for r in spec["require"])
    axis, low = centre_half(spec["relation"][1] if spec["relation"] else "left of", related=True)
    coordinate = "xy"[axis]
    return (first[coordinate] < 0.5) == low and (second[coordinate] < 0.5) != low


@pytest.mark.parametrize("category", ["two_objects", "color_attribution", "position"])
def test_ordered_layouts_lay_two_objects_out_as_the_prompt_reads_and_leave_other_samples_alone(category):
    from mmgen.shapesworld.bench import score_t2i

    ordered, plain = ShapesWorld(seed=4, ordered_layouts=1.0), ShapesWorld(seed=4)
    for i in range(40):
        sample = ordered.sample_at(i, task="t2i", category=category)
        assert _laid_out_as_read(sample.spec), sample.spec
        assert score_t2i(sample.spec, sample.answer[0].image), sample.spec  # still shows what the prompt asks
    # Without the option, "A and B" is laid out either way; a clear relation mostly crosses the centre already.
    assert sum(_laid_out_as_read(plain.sample_at(i, task="t2i", category=category).spec) for i in range(40)) < 40
    for i in range(40):  # other categories draw exactly as without the option
        assert (ordered.sample_at(i, task="t2i", category="counting").spec
                == plain.sample_at(i, task="t2i", category="counting").spec)


@pytest.mark.parametrize("category", ["single_object", "colors", "two_objects", "color_attribution", "position",
                                      "counting"])
def test_layout_plans_name_the_asked_objects_in_the_prompts_order_with_the_cells_of_the_picture(category):
    from transformers import AutoTokenizer

    from mmgen.config import DEFAULT_MODEL_DIR
    from mmgen.evals.shapesbench import GENERATION_LIMITS

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    planned, plain = ShapesWorld(seed=4, layout_plans=1.0), ShapesWorld(seed=4)
    for i in range(30):
        sample, unplanned = (w.sample_at(i, task="t2i", category=category) for w in (planned, plain))
        assert sample.spec == unplanned.spec and len(sample.answer) == 2 and isinstance(sample.answer[0], Text)
        assert np.array_equal(np.asarray(sample.answer[1].image), np.asarray(unplanned.answer[0].image))
        entries = [e.split() for e in sample.answer[0].text.strip().rstrip(".").split(", ")]
        asked = [(r["color"], r["shape"]) for r in sample.spec["require"] for _ in range(r["count"])]
        assert [(c if named else None, s) for (c, s, _), (named, _) in zip(entries, asked)] == asked
        cells = {lang.layout_cell(Obj.from_dict(o)) for o in sample.spec["scene"]}
        assert {cell for _, _, cell in entries} == cells
        if sample.spec["relation"]:
            (_, _, first), (_, _, second) = entries
            rel = sample.spec["relation"][1]
            column, row = (ord(first[0]) - ord(second[0])), int(first[1:]) - int(second[1:])
            assert {"left of": column <= 0, "right of": column >= 0, "above": row <= 0, "below": row >= 0}[rel]
        room = GENERATION_LIMITS["t2i"][0]  # the text ShapesBench lets a model write before its picture
        assert len(tokenizer(sample.answer[0].text)["input_ids"]) < room
    assert lang.layout_cell(Obj("circle", "red", "small", 0.0, 1.0)) == "a8"
    assert lang.layout_cell(Obj("circle", "red", "small", 0.99, 0.126)) == "h2"


def test_story_plans_write_the_whole_scene_before_each_picture_and_the_scorer_reads_past_them():
    """Each step's sentence is followed by the plan of its scene, objects in a fixed order through the story; the
    pictures and the spec are those of the story without plans, whose sentences the story scorer still finds."""
    from transformers import AutoTokenizer

    from mmgen.config import DEFAULT_MODEL_DIR
    from mmgen.evals.shapesbench import GENERATION_LIMITS
    from mmgen.layout import without_plans
    from mmgen.shapesworld import score_story

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    planned, plain = ShapesWorld(seed=5, story_plans=1.0), ShapesWorld(seed=5)
    for i in range(8):
        for category in ("given", "free"):
            sample, unplanned = (w.sample_at(i, task="story", category=category) for w in (planned, plain))
            assert sample.spec == unplanned.spec and len(sample.answer) == len(unplanned.answer)
            for ours, theirs in zip(sample.answer[1::2], unplanned.answer[1::2]):
                assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
            for ours, theirs, scene in zip(sample.answer[::2], unplanned.answer[::2], sample.spec["scenes"]):
                assert ours.text == f"{theirs.text} {lang.layout_plan([Obj.from_dict(o) for o in scene])}"
                assert without_plans(ours.text) == theirs.text
            assert score_story(sample.spec, sample.answer)["consistency"] == 1.0
            text = "".join(t.text for t in sample.answer[::2])
            assert len(tokenizer(text)["input_ids"]) < GENERATION_LIMITS["story"][0], "it fits ShapesBench's limit"
    assert ShapesWorld(seed=5, story_plans=0.0).sample_at(3, task="story").answer[0].text == \
        plain.sample_at(3, task="story").answer[0].text


@pytest.mark.parametrize("category", ["caption", "color_qa", "shape_qa", "count_qa", "position_qa"])
def test_reading_plans_name_every_object_left_to_right_before_an_answer_the_scorer_still_finds(category):
    from transformers import AutoTokenizer

    from mmgen.config import DEFAULT_MODEL_DIR
    from mmgen.evals.shapesbench import GENERATION_LIMITS
    from mmgen.shapesworld import score

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    planned, plain = ShapesWorld(seed=6, reading_plans=1.0), ShapesWorld(seed=6)
    for i in range(30):
        sample, unplanned = (w.sample_at(i, task="i2t", category=category) for w in (planned, plain))
        assert sample.spec == unplanned.spec and sample.prompt[1].text == unplanned.prompt[1].text
        plan, answer = sample.answer[0].text.split(". ", 1)
        assert " " + answer == unplanned.answer[0].text
        objects = sorted((Obj.from_dict(o) for o in sample.spec["scene"]), key=lambda o: (o.x, o.y))
        assert plan.strip().split(", ") == [f"{o.color} {o.shape} {lang.layout_cell(o)}" for o in objects]
        assert score(sample.spec, sample.answer)["correct"] == 1.0, "the scorer reads the answer past the plan"
        room = GENERATION_LIMITS["i2t"][0]
        assert len(tokenizer(sample.answer[0].text)["input_ids"]) < room, "it fits ShapesBench's limit"
    wrong = sample.answer[0].text.replace(answer, unplanned.answer[0].text.replace(" ", " not ", 1))
    assert score(sample.spec, [Text(wrong)])["correct"] == 0.0, "a plan does not make a wrong answer right"


def test_plan_lookups_give_the_plan_in_place_of_the_picture_and_leave_the_answer_to_learn():
    planned, lookups = ShapesWorld(seed=8, reading_plans=1.0), ShapesWorld(seed=8, reading_plans=1.0, plan_lookups=1.0)
    for i in range(20):
        sample, lookup = (w.sample_at(i, task="i2t") for w in (planned, lookups))
        assert lookup.spec == sample.spec
        assert not any(isinstance(s, Image) for s in lookup.prompt), "no picture to read the answer from"
        plan, answer = sample.answer[0].text.split(". ", 1)
        assert [s.text for s in lookup.prompt] == [sample.prompt[1].text.lstrip(), plan + "."]
        assert [s.text for s in lookup.answer] == [" " + answer], "only the answer is learnt"
    half = ShapesWorld(seed=8, reading_plans=1.0, plan_lookups=0.5)
    pictured = [isinstance(half.sample_at(i, task="i2t").prompt[0], Image) for i in range(200)]
    assert 60 < sum(pictured) < 140
    assert ShapesWorld(seed=8, reading_plans=1.0, plan_lookups=0.0).sample_at(3, task="i2t").answer == \
        planned.sample_at(3, task="i2t").answer


def test_story_plan_lookups_tell_the_story_without_pictures_and_leave_one_steps_plan_to_learn():
    """A lookup story is the planned story's text up to a later step's sentence, with no picture; its answer is
    that step's plan. The spec is the story's, and a share of 0 leaves the stories as they were."""
    kwargs = dict(story_plans=1.0, named_story_plans=1.0)
    planned, lookups = ShapesWorld(seed=9, **kwargs), ShapesWorld(seed=9, story_plan_lookups=1.0, **kwargs)
    steps = Counter()
    for i in range(30):
        sample, lookup = (w.sample_at(i, task="story") for w in (planned, lookups))
        assert lookup.spec == sample.spec
        assert not any(isinstance(s, Image) for s in lookup.prompt + lookup.answer), "no picture to copy from"
        told = [s.text for s in sample.answer if isinstance(s, Text)]  # each step's sentence and plan
        step = len(lookup.prompt) - 2
        assert 1 <= step < len(told)
        assert [s.text for s in lookup.prompt] == [sample.prompt[0].text, *told[:step],
                                                   " " + sample.spec["texts"][step]]
        assert [s.text for s in lookup.answer] == [told[step].removeprefix(" " + sample.spec["texts"][step])]
        assert lookup.answer[0].text.endswith(".") and lookup.answer[0].text.count(".") == 1, "only the plan"
        steps[step] += 1
    assert len(steps) >= 2, "the step is drawn"
    half = ShapesWorld(seed=9, story_plan_lookups=0.5, **kwargs)
    pictured = [any(isinstance(s, Image) for s in half.sample_at(i, task="story").answer) for i in range(100)]
    assert 25 < sum(pictured) < 75
    unplanned = ShapesWorld(seed=9, story_plan_lookups=1.0)
    assert all(any(isinstance(s, Image) for s in unplanned.sample_at(i, task="story").answer) for i in range(5)), \
        "only planned stories have plans to look up"
    assert ShapesWorld(seed=9, story_plan_lookups=0.0, **kwargs).sample_at(3, task="story").answer == \
        planned.sample_at(3, task="story").answer


def _entry_object(entry: str) -> ObjSpec:
    """A plan entry ('red circle b3') as the description of its object: its shape and colour."""
    color, shape, _ = entry.split()
    return ObjSpec(shape, color)


def _asked(question: str):
    """What an 'is there' or a 'how many circles / red shapes' question asks about, as a test of an object's
    description; None for other questions."""
    if question.startswith(("is there ", "do you see ")):
        asked = question.removeprefix("is there ").removeprefix("do you see ")
        return lang.parse_object(asked.removesuffix("?").removesuffix(" in the picture")).matches
    if question.startswith("how many ") and question.split()[2] not in ("shapes", "objects"):
        word = question.split()[2]
        return lambda obj: word in (obj.color, lang.PLURALS[obj.shape])
    return None


def test_named_story_plans_follow_the_first_sentence_and_keep_that_order_through_the_story():
    """The first plan lists the objects as the first sentence names them, as a text→image plan does; each later
    plan keeps that order, drops a removed object's entry and puts an added one last. Only the plans differ."""
    from mmgen.layout import without_plans
    from mmgen.shapesworld import score_story

    placed, named = ShapesWorld(seed=5, story_plans=1.0), ShapesWorld(seed=5, story_plans=1.0, named_story_plans=1.0)
    reordered = 0
    for i in range(40):
        sample, before = named.sample_at(i, task="story"), placed.sample_at(i, task="story")
        assert sample.spec == before.spec and [without_plans(t.text) for t in sample.answer[::2]] == \
            [without_plans(t.text) for t in before.answer[::2]]
        plans = [t.text[len(without_plans(t.text)):].strip().rstrip(".").split(", ") for t in sample.answer[::2]]
        stated = lang.parse_caption(sample.spec["texts"][0]).objects
        assert [" ".join(entry.split()[:2]) for entry in plans[0]] == [f"{o.color} {o.shape}" for o in stated]
        for k, (plan, change) in enumerate(zip(plans[1:], sample.spec["changes"])):
            kept = [e for e in plans[k] if not ObjSpec.from_dict(change["target"]).matches(_entry_object(e))]
            scene = [Obj.from_dict(o) for o in sample.spec["scenes"][k + 1]]
            assert sorted(plan) == sorted(lang.layout_plan(scene).rstrip(".").split(", "))
            if change["kind"] == "remove":
                assert plan == kept
            if change["kind"] == "add":
                assert plan[:-1] == plans[k] and plan[-1] not in plans[k]
        assert score_story(sample.spec, sample.answer)["consistency"] == 1.0
        reordered += sample.answer[0].text != before.answer[0].text
    assert reordered >= 10, "first sentences often name the objects in another order than they were placed"
    assert ShapesWorld(seed=5, story_plans=1.0, named_story_plans=0.0).sample_at(7, task="story").answer[2].text == \
        placed.sample_at(7, task="story").answer[2].text


@pytest.mark.parametrize("category", ["shape_qa", "count_qa", "position_qa"])
def test_worked_answers_copy_the_entries_a_question_needs_and_the_scorer_reads_past_them(category):
    """Count, 'is there' and 'where' answers copy the matching entries, or the asked object's and the anchor's,
    between the plan and the answer; 'how many shapes' and the other questions answer as before."""
    from transformers import AutoTokenizer

    from mmgen.config import DEFAULT_MODEL_DIR
    from mmgen.evals.shapesbench import GENERATION_LIMITS
    from mmgen.layout import without_plans
    from mmgen.shapesworld import score

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    planned = ShapesWorld(seed=6, reading_plans=1.0)
    worked = ShapesWorld(seed=6, reading_plans=1.0, worked_answers=1.0)
    kinds = set()
    for i in range(60):
        before, sample = (w.sample_at(i, task="i2t", category=category) for w in (planned, worked))
        assert sample.spec == before.spec and sample.prompt[1].text == before.prompt[1].text
        plan, rest = before.answer[0].text.split(". ", 1)
        text = sample.answer[0].text
        assert text.startswith(plan + ". ") and text.endswith(" " + rest) and without_plans(text) == " " + rest
        copied = text[len(plan) + 2 : len(text) - len(rest) - 1].rstrip(".").split(", ")
        copied = [] if copied == [""] else copied
        entries = plan.strip().split(", ")
        question, spec = sample.prompt[1].text.strip(), sample.spec
        if spec.get("kind") == "where":
            kind = "where"
            target, anchor = copied
            column, row = ord(target[-2]) - ord(anchor[-2]), int(target[-1]) - int(anchor[-1])
            wanted = {"left of": column < 0, "right of": column > 0, "above": row < 0, "below": row > 0}
            assert wanted[spec["relation"]] or abs(column) == abs(row), "the relation is read off the two cells"
            assert _entry_object(anchor).matches(Obj.from_dict(spec["anchor"])) and anchor in entries
            assert target in entries and target != anchor
        elif spec.get("kind") == "presence":
            kind = "presence"
            assert copied == [e for e in entries if _asked(question)(_entry_object(e))], "every match, in order"
            assert rest == ("yes." if copied else "no.")
        elif category == "count_qa" and question.split()[2] in ("shapes", "objects"):
            kind = "all"
            assert text == before.answer[0].text, "the plan already lists what is counted"
        elif category == "count_qa":
            kind = "count"
            expected = [e for e in entries if _asked(question)(_entry_object(e))]
            assert copied == expected and rest == f"{lang.count_word(len(copied))}.", "every match, in order"
        else:
            kind = "other"
            assert text == before.answer[0].text
        kinds.add(kind)
        assert score(spec, sample.answer)["correct"] == 1.0
        assert len(tokenizer(text)["input_ids"]) < GENERATION_LIMITS["i2t"][0], "it fits ShapesBench's limit"
    assert kinds == {"shape_qa": {"presence", "other"}, "count_qa": {"all", "count"},
                     "position_qa": {"where", "other"}}[category]
    assert ShapesWorld(seed=6, reading_plans=1.0, worked_answers=0.0).sample_at(4, task="i2t").answer == \
        planned.sample_at(4, task="i2t").answer


@pytest.mark.parametrize("category", ["shape_qa", "count_qa"])
def test_tallied_answers_count_the_matches_in_the_plan_and_the_scorer_reads_past_them(category):
    """'How many circles / red shapes' and 'is there' answers write the plan with the running count after each
    match, then the count, or yes/no; a lookup answer writes that plan after the plain one in its prompt. Other
    questions, and the rest of the sample, are as before; tallies take the place of worked copies."""
    from transformers import AutoTokenizer

    from mmgen.config import DEFAULT_MODEL_DIR
    from mmgen.evals.shapesbench import GENERATION_LIMITS
    from mmgen.layout import without_plans
    from mmgen.shapesworld import score

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    planned = ShapesWorld(seed=7, reading_plans=1.0, plan_lookups=0.5)
    tallied = ShapesWorld(seed=7, reading_plans=1.0, plan_lookups=0.5, tallied_answers=1.0, worked_answers=1.0)
    kinds, lookups = Counter(), 0
    for i in range(80):
        before, sample = (w.sample_at(i, task="i2t", category=category) for w in (planned, tallied))
        assert sample.spec == before.spec and len(sample.prompt) == len(before.prompt)
        lookup = not isinstance(sample.prompt[0], Image)
        lookups += lookup
        plan = sample.prompt[1].text.strip() if lookup else before.answer[0].text.split(". ", 1)[0].strip() + "."
        rest = without_plans(before.answer[0].text).strip()
        text = sample.answer[0].text.strip()
        question = sample.prompt[0 if lookup else 1].text.strip()
        spec = sample.spec
        matches = _asked(question)
        if matches is None:
            kinds["untallied"] += 1
            assert text == before.answer[0].text.strip(), "other questions answer as before"
            continue
        written, answer = text.rsplit(" ", 1)
        assert answer == rest and without_plans(text).strip() == rest
        entries, tally = [], 0
        for entry in written.rstrip(".").split(", "):
            words = entry.split()
            obj = _entry_object(" ".join(words[:3]))
            if matches(obj):
                tally += 1
                assert words[3:] == [lang.count_word(tally)], f"a match gets the running count: {text}"
            else:
                assert len(words) == 3, f"only matches are counted: {text}"
            entries.append(" ".join(words[:3]))
        assert ", ".join(entries) + "." == plan, "the tallied plan is the picture's plan"
        assert rest == (("yes." if tally else "no.") if spec.get("kind") == "presence" else f"{lang.count_word(tally)}.")
        kinds["presence" if spec.get("kind") == "presence" else "count"] += 1
        assert score(spec, sample.answer)["correct"] == 1.0
        assert len(tokenizer(" " + text)["input_ids"]) < GENERATION_LIMITS["i2t"][0], "it fits ShapesBench's limit"
    assert 10 < lookups < 70
    assert set(kinds) == {"shape_qa": {"presence", "untallied"}, "count_qa": {"count", "untallied"}}[category]
    assert ShapesWorld(seed=7, reading_plans=1.0, worked_answers=1.0, tallied_answers=0.0).sample_at(
        4, task="i2t").answer == ShapesWorld(seed=7, reading_plans=1.0, worked_answers=1.0).sample_at(4, task="i2t").answer


def test_world_rejects_bad_arguments_with_clear_errors():
    world = ShapesWorld(seed=0)
    with pytest.raises(ValueError, match="ordered_layouts must be a share in"):
        ShapesWorld(seed=0, ordered_layouts=1.5)
    with pytest.raises(ValueError, match="layout_plans must be a share in"):
        ShapesWorld(seed=0, layout_plans=-0.1)
    with pytest.raises(ValueError, match="story_plans must be a share in"):
        ShapesWorld(seed=0, story_plans=2)
    with pytest.raises(ValueError, match="reading_plans must be a share in"):
        ShapesWorld(seed=0, reading_plans=1.01)
    with pytest.raises(ValueError, match="plan_lookups must be a share in"):
        ShapesWorld(seed=0, plan_lookups=-1)
    with pytest.raises(ValueError, match="named_story_plans must be a share in"):
        ShapesWorld(seed=0, named_story_plans=1.2)
    with pytest.raises(ValueError, match="worked_answers must be a share in"):
        ShapesWorld(seed=0, worked_answers=-0.5)
    with pytest.raises(ValueError, match="tallied_answers must be a share in"):
        ShapesWorld(seed=0, tallied_answers=1.5)
    with pytest.raises(ValueError, match="story_plan_lookups must be a share in"):
        ShapesWorld(seed=0, story_plan_lookups=True)
    with pytest.raises(ValueError, match="unknown task"):
        world.sample(task="video")
    with pytest.raises(ValueError, match="unknown category"):
        world.sample(category="vibes")
    with pytest.raises(ValueError, match="belongs to task"):
        world.sample(task="t2i", category="caption")
    with pytest.raises(ValueError, match="weights"):
        world.stream(tasks=["t2i"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="unknown category 'vibes' in category_weights"):
        world.sample(category_weights={"vibes": 1.0})
    with pytest.raises(ValueError, match="every category of task 'story'"):
        world.sample(category_weights={"given": 0, "free": 0})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        world.sample(category_weights={"caption": -1})
    with pytest.raises(ValueError, match="must map category names to weights"):
        world.sample(category_weights=["position"])
    with pytest.raises(TypeError):
        ShapesWorld(seed="zero")
