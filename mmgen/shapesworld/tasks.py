"""The ShapesWorld task sampler: training data for the default model and ground truth for ShapesBench.

Formatting convention (it holds for every task):
- A sample is a prompt and an answer, both lists of segments (`Text`, `Image`). Images are rendered
  at the world's size.
- The first segment of a prompt, when it is text, has no leading space. Every other `Text` segment
  starts with one space: prompt texts after an image, and every text of an answer. So prompt + answer
  concatenate into normal text.
- Prompt text ends with its cue: "." after an instruction ("draw a red circle.") or a story
  ("... then the circle turns green."), "?" after a question. The answer follows directly.
- Answers are short and canonical ("red.", "three.", "a red circle left of a blue square."), so that
  exact-match scoring is fair. A story's answer repeats each step's text and follows it with its
  picture: [Text, Image, Text, Image, ...].
- No special tokens anywhere: the stream adds those.

`Sample.spec` is JSON-serialisable ground truth (scenes as lists of dicts, changes, the category). It
is enough to score an answer without the rendered images (see `mmgen.shapesworld.bench`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count

from ..segments import Image, Segment, Text
from . import language as lang
from .render import render
from .scene import (
    COLORS,
    RELATIONS,
    SHAPES,
    Change,
    ObjSpec,
    Scene,
    SceneSpec,
    random_change,
    random_scene,
    relation,
)

TASKS: dict[str, tuple[str, ...]] = {
    "t2i": ("single_object", "two_objects", "counting", "colors", "position", "color_attribution"),
    "i2t": ("caption", "color_qa", "shape_qa", "count_qa", "position_qa"),
    "story": ("given", "free"),
    "edit": ("recolor", "add", "remove", "move"),
}
CATEGORY_TASK: dict[str, str] = {c: t for t, cats in TASKS.items() for c in cats}
DEFAULT_WEIGHTS: dict[str, float] = {"t2i": 0.3, "i2t": 0.3, "story": 0.25, "edit": 0.15}
ORDERED_CATEGORIES = ("two_objects", "color_attribution", "position")  # the two-object t2i prompts
MAX_STEPS = 4  # a story has 2-4 pictures (1-3 changes)


@dataclass
class Sample:
    """One ShapesWorld example: a prompt, its reference answer, and JSON ground truth for scoring."""

    task: str
    category: str
    prompt: list[Segment]
    answer: list[Segment]
    spec: dict = field(default_factory=dict)

    def as_text(self, image_marker: str = "<image>") -> str:
        """Prompt and answer as one string, with `image_marker` in place of each picture (for reading)."""

        def show(segs: Sequence[Segment]) -> str:
            return "".join(s.text if isinstance(s, Text) else image_marker for s in segs)

        return f"{show(self.prompt)} => {show(self.answer)}"


def _spaced(sentence: str) -> Text:
    return Text(" " + sentence)


def _read(scene: Scene) -> list:
    """The scene's objects in the order a reading plan lists them: left to right."""
    return [scene.objects[i] for i in lang.reading_order(scene)]


def _plan_orders(scenes: Sequence[Scene], changes: Sequence[Change], named: Sequence[int]) -> list[list[int]]:
    """Each story scene's object indices in plan order: the start's objects in the order `named` gives,
    then the objects added later, as they came. A change keeps the other objects' order (`Change.apply`)."""
    rank = {start: k for k, start in enumerate(named)}
    ids = list(range(len(scenes[0])))  # each object's start index, or a new number for an added one
    orders = []
    for k, scene in enumerate(scenes):
        if k > 0:
            change = changes[k - 1]
            if change.kind == "remove":
                del ids[scenes[k - 1].resolve(change.target)]
            elif change.kind == "add":
                ids.append(len(scenes[0]) + k)
        orders.append(sorted(range(len(scene)), key=lambda i: rank.get(ids[i], ids[i])))
    return orders


class ShapesWorld:
    """A seeded source of ShapesWorld samples.

    Sample i depends only on (seed, i), so the same seed gives the same samples in the same order.
    `sample_at` gives random access to any of them, which suits data loaders and resumed runs.

    `ordered_layouts` is the share of two-object text→image scenes laid out as their prompt reads: the object
    named first on the left for "A and B", and for "A above B" and the like, the two on opposite sides of the
    centre. Captions already name objects in reading order. A flow head trained on scenes laid out at random
    learns which shapes and colours a prompt names, but neither which colour goes with which shape nor the
    relation: its flow loss is the same for a prompt with the two colours swapped or the relation reversed.
    Ordered layouts make both visible in the picture. At 0 (ShapesBench) the samples are unchanged.

    `layout_plans` is the share of text→image answers that write a layout plan before the picture: every
    object the prompt asks for, in the prompt's order, with its colour and the cell of its centre
    (`language.layout_plan`). The plan turns a relation ("left of") and the binding of colours to shapes into
    text, which the backbone writes well, and hands the flow head each object's place as tokens next to its
    name. At 0 (ShapesBench) the samples are unchanged.

    `story_plans` is the share of stories that write a plan after each step's sentence, before its picture: every
    object of the scene, in a fixed order through the story. A step then changes one entry of the plan before it
    and copies the rest, which a language model does well, and a flow head with a plan input draws each object
    where the plan keeps it. At 0 (ShapesBench) the samples are unchanged.

    `named_story_plans` is the share of those planned stories whose plans list the objects in the order the
    first sentence names them, with objects added later after them; the others list them in the order they
    were placed. The first plan is then written the way a text→image plan is, from the words in front of it
    ("a star above a circle." then the star's entry, then the circle's), not in an order no text shows.

    `story_plan_lookups` is the share of those planned stories given as text without their pictures, up to a
    step's sentence (the prompt, then every earlier step's sentence and plan): only that step's plan is learnt.
    A step's plan is the one before it with the entry the sentence names changed, dropped or added; finding
    that entry by its colour or shape is a lookup in text, which a picture can let the model skip. Not a form
    the model writes.

    `reading_plans` is the share of image→text answers that first write the plan of the picture they read: every
    object, left to right, with its colour and cell, then the answer ("blue star c6, orange square a1. blue.").
    Naming each object with the cell under it is what the image tokens, one per cell, show most directly; which
    colour the star has, what is left of what, or how many squares there are, is then read off text the
    backbone has just written. The scorer reads the answer past the plan. At 0 (ShapesBench) the samples are
    unchanged.

    `plan_lookups` is the share of those planned answers whose picture is left out and whose plan is given in the
    prompt instead, where the planned answer would write it: the tokens are the same but for the picture's, and
    only the answer is learnt. A model that reads its plans right can still answer from the picture and ignore
    them; without a picture, the answer can only be looked up in the plan by the asked word.

    `worked_answers` is the share of planned answers to "how many ...", "is there ..." and "where is ..."
    questions (all but "how many shapes") that copy the plan entries the question needs before answering: the
    matching objects ("purple circle e6, red circle g2. two."; none before a "no."), or the asked object and
    its anchor ("blue circle b5, red star e5. left of the star."). What is left to learn is to count the
    entries of a short list, or to read a relation off two cells side by side. The scorer reads past these
    entries as it reads past plans.

    `tallied_answers` is the share of planned answers to "how many circles / red shapes" and "is there ..."
    questions whose plan counts the matching objects as it names them, each match followed by the running
    count ("red circle b6, blue triangle c3 one, yellow triangle f7 two. two."; "red circle b6. no."), in place
    of a worked answer's copies. Each entry is checked against the question as it is written, and the answer
    is the last count, where a worked answer picks the matches out of the finished plan and counts them
    afterwards. The scorer reads past the tallies.
    """

    def __init__(self, seed: int, size: int = 64, ordered_layouts: float = 0.0, layout_plans: float = 0.0,
                 story_plans: float = 0.0, reading_plans: float = 0.0, plan_lookups: float = 0.0,
                 named_story_plans: float = 0.0, worked_answers: float = 0.0, tallied_answers: float = 0.0,
                 story_plan_lookups: float = 0.0):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.check_share("ordered_layouts", ordered_layouts)
        self.check_share("layout_plans", layout_plans)
        self.check_share("story_plans", story_plans)
        self.check_share("reading_plans", reading_plans)
        self.check_share("plan_lookups", plan_lookups)
        self.check_share("named_story_plans", named_story_plans)
        self.check_share("worked_answers", worked_answers)
        self.check_share("tallied_answers", tallied_answers)
        self.check_share("story_plan_lookups", story_plan_lookups)
        self.seed = seed
        self.size = size
        self.ordered_layouts = float(ordered_layouts)
        self.layout_plans = float(layout_plans)
        self.story_plans = float(story_plans)
        self.reading_plans = float(reading_plans)
        self.plan_lookups = float(plan_lookups)
        self.named_story_plans = float(named_story_plans)
        self.worked_answers = float(worked_answers)
        self.tallied_answers = float(tallied_answers)
        self.story_plan_lookups = float(story_plan_lookups)
        self._next = 0

    # -- public API -------------------------------------------------------------------------

    def sample(
        self,
        task: str | None = None,
        category: str | None = None,
        category_weights: Mapping[str, float] | None = None,
    ) -> Sample:
        """The next sample (of `task` / `category` if given, else of a task drawn by DEFAULT_WEIGHTS)."""
        s = self.sample_at(self._next, task, category, category_weights=category_weights)
        self._next += 1
        return s

    def sample_at(
        self,
        index: int,
        task: str | None = None,
        category: str | None = None,
        tasks: Sequence[str] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        category_weights: Mapping[str, float] | None = None,
    ) -> Sample:
        """Sample number `index` of this world. A task not given is drawn from `tasks` with `weights`; a
        category not given is drawn uniformly from its task's, or by `category_weights` (missing ones: 1)."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        task, category = self._resolve(task, category)
        rng = random.Random(f"shapesworld/{self.seed}/{index}")
        if task is None:
            names, probs = self._task_weights(tasks, weights)
            task = rng.choices(names, weights=probs)[0]
        if category is None:
            category = self._draw_category(rng, task, category_weights)
        return getattr(self, f"_{task}")(rng, category)

    def stream(
        self,
        tasks: Sequence[str] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> Iterator[Sample]:
        """An endless iterator of samples, tasks drawn from `tasks` (default: all) with `weights`."""
        self._task_weights(tasks, weights)  # bad arguments fail here, not at the first next()

        def endless() -> Iterator[Sample]:
            for _ in count():
                s = self.sample_at(self._next, tasks=tasks, weights=weights)
                self._next += 1
                yield s

        return endless()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _resolve(task: str | None, category: str | None) -> tuple[str | None, str | None]:
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
        if category is not None:
            if category not in CATEGORY_TASK:
                raise ValueError(f"unknown category {category!r}; expected one of {list(CATEGORY_TASK)}")
            if task is not None and CATEGORY_TASK[category] != task:
                raise ValueError(f"category {category!r} belongs to task {CATEGORY_TASK[category]!r}, not {task!r}")
            task = CATEGORY_TASK[category]
        return task, category

    @staticmethod
    def _task_weights(tasks, weights) -> tuple[list[str], list[float]]:
        names = list(tasks) if tasks is not None else list(TASKS)
        for t in names:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; expected one of {list(TASKS)}")
        if not names:
            raise ValueError("tasks must not be empty")
        if weights is None:
            probs = [DEFAULT_WEIGHTS[t] for t in names]
        elif isinstance(weights, Mapping):
            probs = [float(weights.get(t, 0.0)) for t in names]
        else:
            probs = [float(w) for w in weights]
            if len(probs) != len(names):
                raise ValueError(f"got {len(probs)} weights for {len(names)} tasks")
        if any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {probs}")
        return names, probs

    @staticmethod
    def check_share(name: str, share: float) -> None:
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
            raise ValueError(f"{name} must be a share in [0, 1], got {share!r}")

    @staticmethod
    def check_category_weights(category_weights: Mapping[str, float]) -> None:
        """Refuse unknown names, negative weights and a task left with nothing to draw, before any sampling."""
        if not isinstance(category_weights, Mapping):
            raise ValueError(f"category_weights must map category names to weights, got {category_weights!r}")
        for name, weight in category_weights.items():
            if name not in CATEGORY_TASK:
                raise ValueError(f"unknown category {name!r} in category_weights; expected one of {list(CATEGORY_TASK)}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"category weight of {name!r} must be a number >= 0, got {weight!r}")
        for task, names in TASKS.items():
            if all(category_weights.get(c, 1.0) == 0 for c in names):
                raise ValueError(f"category_weights give every category of task {task!r} weight 0")

    @classmethod
    def _draw_category(cls, rng: random.Random, task: str, category_weights: Mapping[str, float] | None) -> str:
        if not category_weights:
            return rng.choice(TASKS[task])  # the draw of every stream made without weights
        cls.check_category_weights(category_weights)
        return rng.choices(TASKS[task], weights=[float(category_weights.get(c, 1.0)) for c in TASKS[task]])[0]

    def _image(self, scene: Scene) -> Image:
        return Image(image=render(scene, self.size))

    # -- text to image ----------------------------------------------------------------------

    def _t2i(self, rng: random.Random, category: str) -> Sample:
        shapes = rng.sample(SHAPES, 2)
        colors = rng.sample(COLORS, 2)
        rel = None
        if category == "single_object":
            objs = [ObjSpec(shapes[0])]
        elif category == "colors":
            objs = [ObjSpec(shapes[0], colors[0])]
        elif category == "two_objects":
            objs = [ObjSpec(shapes[0]), ObjSpec(shapes[1])]
        elif category == "color_attribution":
            objs = [ObjSpec(shapes[0], colors[0]), ObjSpec(shapes[1], colors[1])]
        elif category == "position":
            with_color = rng.random() < 0.5
            objs = [ObjSpec(s, c if with_color else None) for s, c in zip(shapes, colors)]
            rel = rng.choice(RELATIONS)
        else:  # counting
            n = rng.randint(2, 4)
            objs = [ObjSpec(shapes[0])] * n
        ordered = category in ORDERED_CATEGORIES and self.ordered_layouts > 0 and rng.random() < self.ordered_layouts
        if category == "counting":
            body = f"{lang.count_word(len(objs))} {lang.PLURALS[objs[0].shape]}"
            scene = random_scene(rng, specs=objs)
        elif rel is not None:
            body = f"{lang.noun_phrase(objs[0])} {lang.relation_phrase(rel, rng)} {lang.noun_phrase(objs[1])}"
            # The anchor is placed first, then the first object clearly `rel` it.
            scene = random_scene(rng, specs=[objs[1], objs[0]], relations=[(1, rel, 0)], across_centre=ordered)
        else:
            body = " and ".join(lang.noun_phrase(o) for o in objs)
            relations = [(1, "right of", 0)] if ordered else ()
            scene = random_scene(rng, specs=objs, relations=relations, across_centre=ordered)
        forms = ["draw {b}.", "a picture of {b}.", "show {b}.", "an image of {b}.", "{b}."]
        prompt = rng.choice(forms).format(b=body)
        require = [{"shape": objs[0].shape, "color": objs[0].color, "count": len(objs)}] if category == "counting" else [
            {"shape": o.shape, "color": o.color, "count": 1} for o in objs
        ]
        spec = {
            "task": "t2i",
            "category": category,
            "prompt": prompt,
            "require": require,
            "relation": None if rel is None else [0, rel, 1],
            "scene": scene.to_dicts(),
        }
        answer: list[Segment] = [self._image(scene)]
        if self.layout_plans > 0 and rng.random() < self.layout_plans:
            # A relation's scene places its anchor, the object named second, first.
            named = scene.objects[::-1] if rel is not None else scene.objects
            answer.insert(0, _spaced(lang.layout_plan(named)))
        return Sample("t2i", category, [Text(prompt)], answer, spec)

    # -- image to text ----------------------------------------------------------------------

    def _i2t(self, rng: random.Random, category: str) -> Sample:
        extra: dict = {}
        needed: list | None = None  # the plan entries a worked answer copies, in its order (None: not worked)
        countable = False  # whether `needed` are the matches a tallied plan counts
        if category == "caption":
            scene = random_scene(rng)
            question, answer = lang.caption_question(rng), lang.caption(scene)
        elif category == "color_qa":
            while True:
                scene = random_scene(rng)
                unique = [i for i in range(len(scene)) if scene.reference(i).color is None]
                if unique:
                    break
            o = scene.objects[rng.choice(unique)]
            question, answer = lang.color_question(ObjSpec(o.shape), o.color, rng)
        elif category == "shape_qa":
            scene = random_scene(rng)
            if rng.random() < 0.35:
                present = rng.random() < 0.5
                shown = {(o.shape, o.color) for o in scene.objects}
                with_color = rng.random() < 0.5
                if present:
                    o = rng.choice(scene.objects)
                    spec_obj = ObjSpec(o.shape, o.color if with_color else None)
                elif with_color:
                    spec_obj = ObjSpec(*rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in shown]))
                else:
                    spec_obj = ObjSpec(rng.choice([s for s in SHAPES if s not in {o.shape for o in scene.objects}]))
                question, answer = lang.presence_question(spec_obj, present, rng)
                extra["kind"] = "presence"
                needed, countable = [o for o in _read(scene) if spec_obj.matches(o)], True
            else:
                while True:
                    colors = [o.color for o in scene.objects]
                    unique = [o for o in scene.objects if colors.count(o.color) == 1]
                    if unique:
                        break
                    scene = random_scene(rng)
                o = rng.choice(unique)
                question, answer = lang.shape_question(o.color, o.shape, rng)
        elif category == "count_qa":
            # Half of the scenes draw from two shapes only, so that shape counts above one are common.
            shapes = rng.sample(SHAPES, 2) if rng.random() < 0.5 else SHAPES
            scene = random_scene(rng, shapes=shapes)
            mode = rng.choice(["all", "shape", "color"])
            if mode == "all":
                question, answer = lang.count_question(len(scene), rng=rng)
            elif mode == "shape":
                shape = rng.choice(scene.objects).shape
                needed, countable = [o for o in _read(scene) if o.shape == shape], True
                question, answer = lang.count_question(len(needed), shape=shape, rng=rng)
            else:
                color = rng.choice(scene.objects).color
                needed, countable = [o for o in _read(scene) if o.color == color], True
                question, answer = lang.count_question(len(needed), color=color, rng=rng)
        else:  # position_qa: two objects, so that the relation is unique and clear
            scene = random_scene(rng, n_objects=2)
            i = rng.randrange(2)
            a, b = scene.objects[i], scene.objects[1 - i]
            rel = relation(a, b)
            if rng.random() < 0.5:
                question, answer = lang.what_relation_question(rel, scene.reference(1 - i), a, rng)
                extra.update(kind="what", target=a.to_dict())
            else:
                question, answer = lang.where_question(scene.reference(i), rel, scene.reference(1 - i), rng)
                extra.update(kind="where", relation=rel, anchor=b.to_dict())
                needed = [a, b]
        spec = {
            "task": "i2t",
            "category": category,
            "question": question,
            "answer": answer,
            "scene": scene.to_dicts(),
            **extra,
        }
        if self.reading_plans > 0 and rng.random() < self.reading_plans:
            plan = lang.layout_plan(_read(scene))
            lookup = self.plan_lookups > 0 and rng.random() < self.plan_lookups
            tallied = countable and self.tallied_answers > 0 and rng.random() < self.tallied_answers
            if tallied:
                # The answer writes the plan with its tallies, a lookup answer too (given the plain plan).
                answer = lang.layout_plan(_read(scene), counted=needed) + " " + answer
            elif needed is not None and self.worked_answers > 0 and rng.random() < self.worked_answers:
                answer = (lang.layout_plan(needed) + " " if needed else "") + answer
            if lookup:
                return Sample("i2t", category, [Text(question), _spaced(plan)], [_spaced(answer)], spec)
            if not tallied:
                answer = plan + " " + answer
        return Sample("i2t", category, [self._image(scene), _spaced(question)], [_spaced(answer)], spec)

    # -- stories ----------------------------------------------------------------------------

    def _story_scenes(self, rng: random.Random, n_changes: int) -> tuple[list[Scene], list[Change]]:
        """A start scene and `n_changes` changes that each apply cleanly."""
        while True:
            scenes = [random_scene(rng, n_objects=rng.randint(1, 3))]
            changes: list[Change] = []
            for _ in range(20 * n_changes):
                if len(changes) == n_changes:
                    break
                change = random_change(rng, scenes[-1])
                try:
                    nxt = change.apply(scenes[-1], rng)
                except ValueError:
                    continue
                changes.append(change)
                scenes.append(nxt)
            if len(changes) == n_changes:
                return scenes, changes

    def _story(self, rng: random.Random, category: str) -> Sample:
        n_steps = rng.randint(2, MAX_STEPS)
        scenes, changes = self._story_scenes(rng, n_steps - 1)
        first, named = lang.naming_caption(scenes[0], rng)
        texts = [first] + [lang.story_step(c, rng) for c in changes]
        start = lang.parse_caption(texts[0])
        if category == "given":
            head = rng.choice(["a story in {n} pictures:", "tell this story in {n} pictures:"])
            prompt = head.format(n=lang.count_word(n_steps)) + " " + " ".join(texts)
            stated_steps: int | None = n_steps
        else:
            about = " and ".join(lang.noun_phrase(o) for o in scenes[0].objects)
            stated_steps = n_steps if rng.random() < 0.5 else None
            if stated_steps is None:
                prompt = rng.choice(["tell a story about {a}.", "make up a story about {a}."]).format(a=about)
            else:
                prompt = f"tell a story in {lang.count_word(n_steps)} pictures about {about}."
            start = SceneSpec(tuple(ObjSpec(o.shape, o.color) for o in scenes[0].objects))
        planned = self.story_plans > 0 and rng.random() < self.story_plans
        if planned and self.named_story_plans > 0 and rng.random() < self.named_story_plans:
            orders = _plan_orders(scenes, changes, named)
        else:
            orders = [range(len(scene)) for scene in scenes]
        plans = [" " + lang.layout_plan([scene.objects[i] for i in order]) if planned else ""
                 for scene, order in zip(scenes, orders)]
        spec = {
            "task": "story",
            "category": category,
            "prompt": prompt,
            "n_steps": stated_steps,
            "start": start.to_dict(),
            "texts": texts,
            "scenes": [s.to_dicts() for s in scenes],
            "changes": [c.to_dict() for c in changes],
        }
        if planned and self.story_plan_lookups > 0 and rng.random() < self.story_plan_lookups:
            step = rng.randrange(1, len(texts))
            told = [_spaced(text + plan) for text, plan in zip(texts[:step], plans)]
            return Sample("story", category, [Text(prompt), *told, _spaced(texts[step])], [Text(plans[step])], spec)
        answer: list[Segment] = []
        for text, plan, scene in zip(texts, plans, scenes):
            answer += [_spaced(text + plan), self._image(scene)]
        return Sample("story", category, [Text(prompt)], answer, spec)

    # -- editing ----------------------------------------------------------------------------

    def _edit(self, rng: random.Random, category: str) -> Sample:
        lo, hi = {"recolor": (1, 4), "add": (1, 3), "remove": (2, 4), "move": (2, 4)}[category]
        while True:
            before = random_scene(rng, n_objects=rng.randint(lo, hi))
            change = random_change(rng, before, kinds=[category])
            try:
                after = change.apply(before, rng)
                break
            except ValueError:
                continue
        instruction = lang.change_sentence(change, rng, imperative=True)
        spec = {
            "task": "edit",
            "category": category,
            "instruction": instruction,
            "scene": before.to_dicts(),
            "change": change.to_dict(),
            "target": after.to_dicts(),
        }
        prompt = [self._image(before), _spaced(instruction)]
        return Sample("edit", category, prompt, [self._image(after)], spec)
