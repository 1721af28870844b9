"""ShapesWorld: a seeded, procedural world of flat shapes.

It is the training data of the embedded default model and the ground truth of ShapesBench.

- `scene`: vocabulary, objects, relations, the scene sampler, changes;
- `render`: anti-aliased, deterministic rendering;
- `language`: varied captions, questions and change sentences, and their parsers;
- `tasks`: the task sampler (`ShapesWorld`, `Sample`);
- `parser`: reads images back into objects;
- `bench`: scores answers against a sample's spec.
"""

from .bench import (
    bench_samples,
    change_holds,
    relation_reading,
    score,
    score_edit,
    score_i2t,
    score_story,
    score_t2i,
    summarize,
)
from .language import caption, change_sentence, normalize_answer, parse_caption, parse_change, parse_object
from .parser import Detected, parse_image, scene_matches, spec_matches
from .render import render
from .scene import (
    BACKGROUND,
    COLORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    Change,
    Obj,
    ObjSpec,
    Scene,
    SceneSpec,
    is_clear,
    random_change,
    random_scene,
    relation,
)
from .tasks import TASKS, Sample, ShapesWorld

__all__ = [
    "BACKGROUND", "COLORS", "PALETTE", "RELATIONS", "SHAPES", "SIZES", "TASKS",
    "Change", "Detected", "Obj", "ObjSpec", "Sample", "Scene", "SceneSpec", "ShapesWorld",
    "bench_samples", "caption", "change_holds", "change_sentence", "is_clear", "normalize_answer",
    "parse_caption", "parse_change", "parse_image", "parse_object", "random_change", "random_scene",
    "relation", "relation_reading", "render", "scene_matches", "score", "score_edit", "score_i2t", "score_story",
    "score_t2i", "spec_matches", "summarize",
]
