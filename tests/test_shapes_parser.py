"""Specification of the ShapesBench parser and scorers.

The parser's verdicts on generated images are trusted only because it reads clean renders almost
perfectly and degrades gracefully under blur and noise. These tests measure that.
"""

from __future__ import annotations

import random

import numpy as np
import PIL.Image
import pytest
from PIL import ImageEnhance, ImageFilter

from mmgen.segments import Image, Text
from mmgen.shapesworld import (
    BACKGROUND,
    TASKS,
    Obj,
    Scene,
    ShapesWorld,
    parse_image,
    random_scene,
    relation_reading,
    render,
    scene_matches,
    score,
    score_edit,
    score_i2t,
    score_story,
    score_t2i,
)
from mmgen.shapesworld.bench import bench_samples, summarize
from mmgen.shapesworld.language import COUNT_WORDS, RELATION_PHRASES

POSITION_TOL = 0.03  # about 2 px at 64x64


def _degrade(img: PIL.Image.Image, radius: float, noise: float, rng: np.random.Generator) -> PIL.Image.Image:
    """Gaussian blur plus Gaussian pixel noise: a stand-in for a small VAE's or generator's output."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    arr = arr + rng.normal(0.0, noise, arr.shape)
    return PIL.Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def _accuracy(n: int, seed: int, degrade=None) -> tuple[float, list[str]]:
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    correct, failures = 0, []
    for _ in range(n):
        scene = random_scene(rng)
        img = render(scene)
        if degrade is not None:
            img = degrade(img, noise_rng)
        detected = parse_image(img)
        if scene_matches(detected, scene, check_position=True, tol=POSITION_TOL, check_size=True):
            correct += 1
        elif len(failures) < 3:
            failures.append(f"{[(o.shape, o.color, o.size) for o in scene.objects]} read as "
                            f"{[(d.shape, d.color, d.size) for d in detected]}")
    return correct / n, failures


def test_parser_reads_clean_renders_of_1000_scenes():
    acc, failures = _accuracy(1000, seed=100)
    assert acc >= 0.99, f"clean parser accuracy {acc:.4f} < 0.99; e.g. {failures}"


def test_parser_tolerates_blur_and_noise():
    acc, failures = _accuracy(1000, seed=200, degrade=lambda img, r: _degrade(img, 0.8, 6.0, r))
    assert acc >= 0.95, f"blurred parser accuracy {acc:.4f} < 0.95; e.g. {failures}"


def _pale_and_drifted(img: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """Colours 30% paler and shifted up to 8 degrees in hue, then blurred and noisy, like a weak generator."""
    img = ImageEnhance.Color(img).enhance(0.7)
    hsv = np.asarray(img.convert("HSV")).astype(np.int64)
    hsv[..., 0] = (hsv[..., 0] + int(round(rng.uniform(-8, 8) / 360 * 256))) % 256
    img = PIL.Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    return _degrade(img, 1.0, 8.0, rng)


def test_parser_tolerates_pale_and_hue_drifted_colours():
    acc, failures = _accuracy(300, seed=250, degrade=_pale_and_drifted)
    assert acc >= 0.95, f"parser accuracy on pale, drifted, blurred images {acc:.4f} < 0.95; e.g. {failures}"


def test_parser_separates_touching_objects_of_different_colours():
    for shape_a, shape_b in [("square", "square"), ("circle", "square"), ("circle", "circle")]:
        scene = Scene((Obj(shape_a, "red", "large", 0.35, 0.5), Obj(shape_b, "blue", "large", 0.65, 0.5)))
        assert scene_matches(parse_image(render(scene)), scene, tol=POSITION_TOL), (shape_a, shape_b)


def test_parser_reads_any_resolution():
    rng = random.Random(300)
    for _ in range(20):
        scene = random_scene(rng)
        for size in (48, 128):
            assert scene_matches(parse_image(render(scene, size)), scene, tol=POSITION_TOL), size


def test_parser_ignores_the_background_noise_and_specks():
    rng = np.random.default_rng(0)
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.float64) + rng.normal(0, 8, (64, 64, 3))
    blank[10:12, 10:12] = (220, 30, 30)  # a 4-pixel red speck
    assert parse_image(PIL.Image.fromarray(np.clip(blank, 0, 255).astype(np.uint8))) == []


def test_parser_reports_geometry_and_accepts_image_segments():
    scene = Scene((Obj("triangle", "green", "large", 0.3, 0.6), Obj("star", "purple", "small", 0.75, 0.25)))
    detected = parse_image(Image(render(scene)))
    assert [(d.shape, d.color, d.size) for d in detected] == [("triangle", "green", "large"), ("star", "purple", "small")]
    assert abs(detected[0].x - 0.3) < 0.01 and abs(detected[0].y - 0.6) < 0.01
    assert detected[0].area > detected[1].area > 0
    with pytest.raises(TypeError, match="PIL.Image"):
        parse_image("not an image")


# -- scorers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("category", [c for cats in TASKS.values() for c in cats])
def test_scorers_accept_the_ground_truth_answer(category):
    world = ShapesWorld(seed=21)
    for _ in range(4):
        sample = world.sample(category=category)
        result = score(sample.spec, sample.answer)
        assert result["correct"] == 1.0, (sample.as_text(), result)
        if sample.task == "story":
            assert result["structure"] and result["consistency"] == 1.0


def _recolored(scene_dicts: list[dict], index: int = 0) -> Scene:
    scene = Scene.from_dicts(scene_dicts)
    objs = list(scene.objects)
    o = objs[index]
    new = next(c for c in ("red", "green", "blue", "yellow") if c != o.color and
               not any(p.shape == o.shape and p.color == c for p in objs))
    objs[index] = Obj(o.shape, new, o.size, o.x, o.y)
    return Scene(tuple(objs))


def test_t2i_scorer_rejects_a_wrong_colour_a_missing_object_and_a_wrong_count():
    world = ShapesWorld(seed=22)
    colors = world.sample(category="colors")
    assert not score_t2i(colors.spec, render(_recolored(colors.spec["scene"])))
    two = world.sample(category="two_objects")
    assert not score_t2i(two.spec, render(Scene(Scene.from_dicts(two.spec["scene"]).objects[:1])))
    counting = world.sample(category="counting")
    objs = Scene.from_dicts(counting.spec["scene"]).objects
    assert not score_t2i(counting.spec, render(Scene(objs[:-1])))
    attribution = world.sample(category="color_attribution")
    a, b = Scene.from_dicts(attribution.spec["scene"]).objects
    swapped = Scene((Obj(a.shape, b.color, a.size, a.x, a.y), Obj(b.shape, a.color, b.size, b.x, b.y)))
    assert not score_t2i(attribution.spec, render(swapped))


def test_t2i_position_scorer_checks_the_relation():
    sample = ShapesWorld(seed=23).sample(category="position")
    a, b = Scene.from_dicts(sample.spec["scene"]).objects
    mirrored = Scene((Obj(a.shape, a.color, a.size, 1 - a.x, 1 - a.y), Obj(b.shape, b.color, b.size, 1 - b.x, 1 - b.y)))
    assert score_t2i(sample.spec, sample.answer[0])
    assert not score_t2i(sample.spec, render(mirrored))


def test_relation_reading_tells_a_reversed_relation_from_a_wrong_axis_and_a_missing_object():
    sample = ShapesWorld(seed=23).sample(category="position")
    a, b = Scene.from_dicts(sample.spec["scene"]).objects
    mirrored = Scene((Obj(a.shape, a.color, a.size, 1 - a.x, 1 - a.y), Obj(b.shape, b.color, b.size, 1 - b.x, 1 - b.y)))
    transposed = Scene((Obj(a.shape, a.color, a.size, a.y, a.x), Obj(b.shape, b.color, b.size, b.y, b.x)))
    assert relation_reading(sample.spec, sample.answer[0]) == "held"
    assert relation_reading(sample.spec, render(mirrored)) == "reversed"
    assert relation_reading(sample.spec, render(transposed)) == "other axis"
    assert relation_reading(sample.spec, render(Scene((a,)))) is None
    assert score(sample.spec, render(mirrored))["relation"] == "reversed"
    assert "relation" not in score(ShapesWorld(seed=23).sample(category="colors").spec, sample.answer[0])
    with pytest.raises(ValueError, match="states no relation"):
        relation_reading(ShapesWorld(seed=23).sample(category="two_objects").spec, sample.answer[0])


def test_i2t_scorer_matches_canonical_answers_and_rejects_wrong_ones():
    world = ShapesWorld(seed=24)
    color = world.sample(category="color_qa")
    assert score_i2t(color.spec, color.spec["answer"].upper())
    wrong = "green." if color.spec["answer"] != "green." else "red."
    assert not score_i2t(color.spec, wrong)
    assert not score_i2t(color.spec, [Image(render(Scene.from_dicts(color.spec["scene"])))])
    count = world.sample(category="count_qa")
    n = COUNT_WORDS.index(count.spec["answer"].rstrip("."))
    assert score_i2t(count.spec, f"{n}.") and not score_i2t(count.spec, f"{n + 1}.")
    cap = world.sample(category="caption")
    scene = Scene.from_dicts(cap.spec["scene"])
    assert score_i2t(cap.spec, [Text(" " + cap.spec["answer"])])
    assert not score_i2t(cap.spec, "a " + ("green" if scene.objects[0].color != "green" else "red") + " " + scene.objects[0].shape + ".")
    assert not score_i2t(cap.spec, "a dog.")


def test_position_answers_may_name_objects_more_fully_but_not_wrongly():
    world = ShapesWorld(seed=30)
    kinds = set()
    for _ in range(12):
        sample = world.sample(category="position_qa")
        spec = sample.spec
        kinds.add(spec["kind"])
        if spec["kind"] == "where":
            anchor = spec["anchor"]
            synonym = RELATION_PHRASES[spec["relation"]][-1]  # e.g. "on the left of", "beneath"
            assert score_i2t(spec, f"{synonym} the {anchor['color']} {anchor['shape']}.")
            opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[spec["relation"]]
            assert not score_i2t(spec, f"{opposite} the {anchor['shape']}.")
        else:
            target = spec["target"]
            assert score_i2t(spec, f"the {target['color']} {target['shape']}")
            other = next(s for s in ("circle", "square", "triangle") if s != target["shape"])
            assert not score_i2t(spec, f"a {target['color']} {other}.")
    assert kinds == {"what", "where"}


def test_story_scorer_flags_broken_structure_and_inconsistent_steps():
    sample = ShapesWorld(seed=25).sample(category="given")
    answer = list(sample.answer)
    # An image where the second text should be.
    broken = answer[:2] + [answer[1]] + answer[3:]
    assert not score_story(sample.spec, broken)["structure"]
    # A missing last picture.
    assert not score_story(sample.spec, answer[:-1])["structure"]
    # The last picture does not follow its change: show the previous picture again.
    stale = answer[:-1] + [answer[-3]]
    result = score_story(sample.spec, stale)
    assert result["structure"] and result["consistency"] < 1.0 and result["steps"][-1] is False


def test_free_story_scorer_reads_the_changes_from_the_answer_text():
    sample = ShapesWorld(seed=26).sample(category="free")
    assert score_story(sample.spec, sample.answer)["consistency"] == 1.0
    answer = list(sample.answer)
    answer[2] = Text(" then the moon turns blue.")  # unparseable change text
    assert score_story(sample.spec, answer)["steps"][1] is False


def test_edit_scorer_rejects_an_unchanged_image():
    world = ShapesWorld(seed=27)
    for kind in ("recolor", "add", "remove", "move"):
        sample = world.sample(category=kind)
        assert score_edit(sample.spec, sample.answer[0])
        assert not score_edit(sample.spec, sample.prompt[0]), kind


def test_scorers_survive_mild_blur_of_the_answer_images():
    world = ShapesWorld(seed=28)
    noise = np.random.default_rng(0)
    total = passed = 0
    for category in ("position", "color_attribution", "recolor", "move", "given"):
        for _ in range(5):
            sample = world.sample(category=category)
            answer = [Image(_degrade(s.image, 0.8, 5.0, noise)) if isinstance(s, Image) else s for s in sample.answer]
            passed += score(sample.spec, answer)["correct"] == 1.0
            total += 1
    assert passed / total >= 0.9, f"only {passed}/{total} ground-truth answers survive blur"


def test_scorers_reject_specs_of_another_task():
    sample = ShapesWorld(seed=29).sample(category="colors")
    with pytest.raises(ValueError, match="'edit'"):
        score_edit(sample.spec, sample.answer[0])
    with pytest.raises(TypeError):
        score_t2i(sample.spec, "an image, promise")


def test_bench_samples_cover_every_category_and_summarize_reports_them():
    samples = bench_samples(seed=5, per_category=1)
    assert sorted(s.category for s in samples) == sorted(c for cats in TASKS.values() for c in cats)
    records = [score(s.spec, s.answer) for s in samples]
    summary = summarize(records)
    assert summary["t2i"]["accuracy"] == 1.0 and summary["story/given"]["consistency"] == 1.0
