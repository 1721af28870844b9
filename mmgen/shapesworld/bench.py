"""ShapesBench: score answers to ShapesWorld prompts against `Sample.spec`.

Images are read with the parser (`parse_image`) and text with the language parsers, so each verdict
depends only on the spec and the answer, never on the reference images. The text-to-image rules
follow GenEval: the requested objects must be present with the right shape; the colour is checked
when asked; counting needs the exact number; position needs the relation on the dominant axis;
colour attribution needs each colour on the right shape. Objects that were not asked for are
ignored, except by counting.

An answer image must also be explained by its objects: an image with much saturated area outside the
parser's accepted objects, or with more than a few blobs that are no credible object, fails whatever
it asks for. Noise, smooth colour fields and solid fills fail this way, instead of passing on a lucky
blob that happens to have the asked-for shape.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import PIL.Image

from ..layout import without_plans
from ..segments import Image, Segment, Text, as_segments
from .language import normalize_answer, parse_caption, parse_change, parse_object
from .parser import Detected, find, match_all, read_image, same_object, scene_matches, spec_matches
from .scene import Change, Obj, ObjSpec, Scene, SceneSpec, relation
from .tasks import TASKS, ShapesWorld

logger = logging.getLogger(__name__)

CHANGE_TOL = 0.1  # how far (fraction of the image side) an object may drift between steps and still count as unmoved
# Unexplained content an answer image may hold. Degraded renders (blur, noise, pale colours, VAE
# round trips) stay below 0.035 clutter and 2 rejected blobs; noise images that show a credible object
# at all have clutter of 0.13 or more.
MAX_CLUTTER = 0.05  # fraction of the image's pixels saturated outside accepted objects
MAX_REJECTED = 2  # blobs that are not credibly one of the world's objects


def _pil(image: Any) -> PIL.Image.Image:
    if isinstance(image, Image):
        if image.image is None:
            raise ValueError("the Image segment holds only a latent; decode it to pixels before scoring")
        return image.image
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, (list, tuple)) and len(image) == 1:
        return _pil(image[0])
    raise TypeError(f"expected a PIL.Image or an Image segment, got {type(image).__name__}")


def _text(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, Text):
        return answer.text
    if isinstance(answer, (list, tuple)):
        if any(isinstance(s, Image) for s in answer):
            return ""  # an image where only text was asked for
        return "".join(_text(s) for s in answer)
    raise TypeError(f"expected text (str, Text or a list of Text), got {type(answer).__name__}")


def _check_spec(spec: Any, task: str) -> None:
    if not isinstance(spec, dict) or spec.get("task") != task:
        got = spec.get("task") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"expected the spec of a {task!r} sample, got {got!r}")


def _scene(items: Sequence[dict]) -> Scene:
    return Scene.from_dicts(items)


def read_answer(image: Any) -> tuple[list[Detected], bool]:
    """The objects of an answer image, and whether they explain it: not too much saturated area outside
    them (clutter) and not more than a few rejected blobs."""
    reading = read_image(_pil(image))
    return reading.objects, reading.clutter <= MAX_CLUTTER and len(reading.rejected) <= MAX_REJECTED


# ----------------------------------------------------------------------------------------------
# Text to image
# ----------------------------------------------------------------------------------------------


def score_t2i(spec: dict, image: Any) -> bool:
    """GenEval-style verdict for a generated image (see the module docstring for the rules)."""
    _check_spec(spec, "t2i")
    return _t2i_verdict(spec, *read_answer(image))


def _t2i_verdict(spec: dict, detected: list[Detected], explained: bool) -> bool:
    if not explained:
        return False
    required: list[ObjSpec] = []
    for req in spec["require"]:
        obj = ObjSpec(req["shape"], req.get("color"))
        if spec["category"] == "counting" and len(find(detected, obj)) != req["count"]:
            return False
        required += [obj] * int(req["count"])
    relations = () if spec.get("relation") is None else (tuple(spec["relation"]),)
    return spec_matches(detected, SceneSpec(tuple(required), relations), exact=False)


def relation_reading(spec: dict, image: Any) -> str | None:
    """Where a text-to-image answer to a relation prompt ("a circle left of a square") put its two objects:
    "held", "reversed" (on the asked axis, the other way round) or "other axis"; None when the image does not
    show each of them exactly once. It tells a model that ignores which way a relation points from one that
    cannot draw the objects."""
    _check_spec(spec, "t2i")
    if spec.get("relation") is None:
        raise ValueError(f"the {spec['category']!r} prompt {spec['prompt']!r} states no relation")
    return _relation_reading(spec, *read_answer(image))


def _relation_reading(spec: dict, detected: list[Detected], explained: bool) -> str | None:
    first, rel, second = spec["relation"]
    found = [find(detected, ObjSpec(spec["require"][k]["shape"], spec["require"][k].get("color")))
             for k in (first, second)]
    if not explained or any(len(f) != 1 for f in found):
        return None
    a, b = detected[found[0][0]], detected[found[1][0]]
    return "held" if relation(a, b) == rel else "reversed" if relation(b, a) == rel else "other axis"


# ----------------------------------------------------------------------------------------------
# Image to text
# ----------------------------------------------------------------------------------------------


ANSWER_TYPES = ("yes/no", "number", "other")


def answer_type(spec: dict) -> str | None:
    """The answer type of an image-to-text question, as VQA v2 splits them: "yes/no" (is there ...?),
    "number" (how many ...?) or "other"; None for a caption. A yes/no accuracy far below the others shows a
    model that answers from the question alone, which a category's mean can hide."""
    if spec["category"] == "caption":
        return None
    if spec.get("kind") == "presence":
        return "yes/no"
    return "number" if spec["category"] == "count_qa" else "other"


def score_i2t(spec: dict, text: Any) -> bool:
    """True if the answer text is right.

    A caption must name exactly the scene's objects, and any relation it states must hold (a
    two-object caption may leave the relation out). A "what is left of the square?" answer must name
    that object. A "where is ...?" answer must give the relation and name the anchor. Other answers
    must equal the canonical answer after normalisation (case, articles, digits, synonyms). A plan of the
    picture before the answer (`ShapesWorld`, `reading_plans`) is passed over.
    """
    _check_spec(spec, "i2t")
    answer = without_plans(_text(text))
    if not answer.strip():
        return False
    scene = _scene(spec["scene"])
    if spec["category"] == "caption":
        try:
            stated = parse_caption(answer)
        except ValueError:
            return False
        return spec_matches(scene.objects, stated, exact=True)
    if spec.get("kind") == "what":
        try:
            named = parse_object(answer)
        except ValueError:
            return False
        return named.matches(Obj.from_dict(spec["target"]))
    if spec.get("kind") == "where":
        words = normalize_answer(answer)
        if not words.startswith(spec["relation"] + " "):
            return False
        try:
            return parse_object(words[len(spec["relation"]) + 1 :]).matches(Obj.from_dict(spec["anchor"]))
        except ValueError:
            return False
    return normalize_answer(answer) == normalize_answer(spec["answer"])


# ----------------------------------------------------------------------------------------------
# Changes: stories and edits
# ----------------------------------------------------------------------------------------------


def change_holds(before: Sequence[Any], change: Change, after: Sequence[Any], tol: float = CHANGE_TOL) -> bool:
    """True if `after` is `before` with `change` applied.

    The objects the change does not mention keep their shape, colour and place (within `tol`). A
    recoloured object keeps its shape and place. An added object fits its description and stands in
    the stated relation to the anchor. A moved object stands in the stated relation to the anchor.
    """
    before, after = list(before), list(after)
    if change.kind == "add":
        anchors = find(before, change.anchor)
        if len(anchors) != 1 or len(after) != len(before) + 1:
            return False
        expected: list[Any] = [*before, change.target]
    else:
        targets = find(before, change.target)
        if len(targets) != 1:
            return False
        t = targets[0]
        if change.kind == "remove":
            return scene_matches(after, [o for k, o in enumerate(before) if k != t], True, tol, check_size=False)
        if change.kind == "recolor":
            expected = [replace(o, color=change.color) if k == t else o for k, o in enumerate(before)]
            return scene_matches(after, expected, True, tol, check_size=False)
        anchors = find(before, change.anchor)
        if len(anchors) != 1 or anchors[0] == t or len(after) != len(before):
            return False
        expected = list(before)
    free = len(before) if change.kind == "add" else t  # the expected item whose place is free

    def pair_ok(k: int, f: Any) -> bool:
        if k == free:
            if change.kind == "add":
                return change.target.matches(f)
            return f.shape == before[t].shape and f.color == before[t].color
        return same_object(expected[k], f, check_position=True, tol=tol, check_size=False)

    anchor = anchors[0]
    for perm in match_all(list(range(len(expected))), after, pair_ok):
        if relation(after[perm[free]], after[perm[anchor]]) == change.relation:
            return True
    return False


def _story_pairs(segments: Sequence[Segment]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The (text, image) steps of a story answer, and its layout as a string of 'T'/'I'.

    Adjacent texts are merged and blank texts dropped, since decoders may split text anywhere.
    """
    layout: list[str] = []
    items: list[Segment] = []
    for s in segments:
        if isinstance(s, Text):
            if not s.text.strip():
                continue
            if items and isinstance(items[-1], Text):
                items[-1] = Text(items[-1].text + s.text)
                continue
        items.append(s)
    layout = ["T" if isinstance(s, Text) else "I" for s in items]
    pairs = [
        (items[k].text, items[k + 1])
        for k in range(len(items) - 1)
        if isinstance(items[k], Text) and isinstance(items[k + 1], Image)
    ]
    return pairs, layout


def score_story(spec: dict, segments: Any, tol: float = CHANGE_TOL) -> dict:
    """Score an interleaved story answer.

    - structure: the answer is Text, Image, Text, Image, ... with one picture per step (the number of
      steps the prompt asks for, or at least two when it asks for none).
    - consistency: the fraction of steps that are right. Step 1's picture must show the stated start
      scene. Each later picture must equal the previous picture with the step's change applied (read
      from the spec for given stories, parsed from the answer's own text for free ones, past any layout plan).
    """
    _check_spec(spec, "story")
    pairs, layout = _story_pairs(as_segments(list(segments)))
    n_steps = spec.get("n_steps")
    structure = layout == ["T", "I"] * (n_steps or len(pairs)) and len(pairs) >= (n_steps or 2)
    expected = n_steps or max(len(pairs), 2)
    free = spec["category"] == "free"
    start = SceneSpec.from_dict(spec["start"])
    steps: list[bool] = []
    previous: list[Detected] | None = None
    for k, (text, image) in enumerate(pairs[:expected]):
        detected, explained = read_answer(image)
        if not explained:
            ok = False
        elif k == 0:
            ok = spec_matches(detected, start, exact=True)
            if ok and free:
                try:
                    ok = spec_matches(detected, parse_caption(without_plans(text)), exact=True)
                except ValueError:
                    ok = False
        else:
            try:
                change = parse_change(without_plans(text)) if free else Change.from_dict(spec["changes"][k - 1])
                ok = change_holds(previous, change, detected, tol)
            except ValueError:
                ok = False
        steps.append(ok)
        previous = detected
    steps += [False] * (expected - len(steps))
    return {"structure": structure, "consistency": sum(steps) / expected, "steps": steps}


def score_edit(spec: dict, image: Any, tol: float = CHANGE_TOL) -> bool:
    """True if the edited image is the source scene with the instructed change applied."""
    _check_spec(spec, "edit")
    before = _scene(spec["scene"]).objects
    detected, explained = read_answer(image)
    return explained and change_holds(before, Change.from_dict(spec["change"]), detected, tol)


# ----------------------------------------------------------------------------------------------
# Benchmark runs
# ----------------------------------------------------------------------------------------------


def score(spec: dict, answer: Any) -> dict:
    """Score any ShapesWorld answer. Returns {"task", "category", "correct": float in [0, 1], ...}, with the
    `answer_type` of an image-to-text question and the `relation_reading` of a relation prompt's image."""
    if not isinstance(spec, dict) or spec.get("task") not in TASKS:
        raise ValueError(f"not a ShapesWorld spec: {spec!r:.80}")
    task, category = spec["task"], spec["category"]
    out: dict = {"task": task, "category": category}
    if task == "story":
        result = score_story(spec, answer)
        out.update(result, correct=float(result["structure"]) * result["consistency"])
        return out
    if task == "i2t":
        out["correct"] = float(score_i2t(spec, answer))
        if (kind := answer_type(spec)) is not None:
            out["answer_type"] = kind
        return out
    images = [s for s in as_segments(list(answer) if isinstance(answer, (list, tuple)) else [answer])
              if isinstance(s, Image)]
    if len(images) != 1:
        out["correct"] = 0.0
        return out
    if task == "edit":
        out["correct"] = float(score_edit(spec, images[0]))
        return out
    _check_spec(spec, "t2i")
    reading = read_answer(images[0])  # one parse serves the verdict and the relation's reading
    out["correct"] = float(_t2i_verdict(spec, *reading))
    if spec.get("relation") is not None:
        out["relation"] = _relation_reading(spec, *reading)
    return out


def bench_samples(seed: int = 1234, per_category: int = 20, size: int = 64) -> list:
    """A fixed benchmark set: `per_category` samples of every task category, from a world of `seed`.

    Samples are numbered across categories, so every category but the first gets other samples at another
    `per_category`: figures compare only between runs at the same n."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    world = ShapesWorld(seed, size=size)
    out, index = [], 0
    for cats in TASKS.values():
        for category in cats:
            for _ in range(per_category):
                out.append(world.sample_at(index, category=category))
                index += 1
    return out


def summarize(records: Iterable[dict]) -> dict:
    """Mean `correct` per task/category and per task (and story structure and consistency)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[f"{r['task']}/{r['category']}"].append(r)
        groups[r["task"]].append(r)
    summary: dict = {}
    for key, rs in sorted(groups.items()):
        entry = {"n": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs)}
        if key.startswith("story"):
            entry["structure"] = sum(bool(r["structure"]) for r in rs) / len(rs)
            entry["consistency"] = sum(r["consistency"] for r in rs) / len(rs)
        summary[key] = entry
    logger.info("ShapesBench summary over %d groups", len(summary))
    return summary
