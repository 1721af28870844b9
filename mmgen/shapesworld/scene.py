"""ShapesWorld scenes: the vocabulary, objects, spatial relations, the scene sampler and scene changes.

A scene is a few flat shapes on a plain background. Coordinates are normalised to [0, 1] with y
pointing down, so a scene renders at any resolution. Within one scene every (shape, colour) pair is
unique, so "the red circle" (or "the circle", when it is the only circle) always names one object.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CHANGE_KINDS: tuple[str, ...] = ("recolor", "add", "remove", "move")

# Saturated colours 27-100 degrees apart in hue (red 0, orange 29, yellow 57, green 129, blue 227,
# purple 279), so a hue segmentation tells them apart even
# after blur (blending with the neutral background keeps the hue) and mild colour drift.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 120, 0),
    "yellow": (240, 226, 0),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "purple": (150, 45, 205),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

# Half the side of an object's bounding box, as a fraction of the image side. At 64 px a small object
# spans ~11.5 px and a large one ~20.5 px.
RADIUS: dict[str, float] = {"small": 0.09, "large": 0.16}
EDGE_MARGIN = 0.03  # free border between any object's box and the image edge
MIN_GAP = 0.07  # minimum gap between two objects' boxes along at least one axis (~4.5 px at 64)
CLEAR_RATIO = 2.0  # a relation is stated only when the dominant axis offset is this many times the other
MIN_OBJECTS, MAX_OBJECTS = 1, 4
GRID = 128  # centres are multiples of 1/GRID: exact in JSON and identical when re-rendered


def _check(value: Any, allowed: Sequence[str], what: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its centre (x, y) is the centre of its bounding box, in [0, 1], y down."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.size, SIZES, "size")
        for name in ("x", "y"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"Obj.{name} must be a number in [0, 1], got {v!r}")

    @property
    def radius(self) -> float:
        return RADIUS[self.size]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(d["shape"], d["color"], d["size"], float(d["x"]), float(d["y"]))


@dataclass(frozen=True)
class ObjSpec:
    """A partial description of an object ("a red circle", "the circle"): None means "any"."""

    shape: str
    color: str | None = None
    size: str | None = None

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color", optional=True)
        _check(self.size, SIZES, "size", optional=True)

    def matches(self, obj: Any) -> bool:
        """True if `obj` (anything with shape/color/size) fits this description."""
        return (
            obj.shape == self.shape
            and (self.color is None or obj.color == self.color)
            and (self.size is None or obj.size == self.size)
        )

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> ObjSpec:
        return cls(d["shape"], d.get("color"), d.get("size"))


@dataclass(frozen=True)
class SceneSpec:
    """What a caption or prompt states about a scene: its objects and relations (i, relation, j)."""

    objects: tuple[ObjSpec, ...]
    relations: tuple[tuple[int, str, int], ...] = ()

    def __post_init__(self):
        for i, rel, j in self.relations:
            _check(rel, RELATIONS, "relation")
            if not (0 <= i < len(self.objects) and 0 <= j < len(self.objects)) or i == j:
                raise ValueError(f"relation ({i}, {rel!r}, {j}) does not index two distinct objects")

    def to_dict(self) -> dict:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "relations": [[i, rel, j] for i, rel, j in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        return cls(
            tuple(ObjSpec.from_dict(o) for o in d["objects"]),
            tuple((int(i), rel, int(j)) for i, rel, j in d.get("relations", ())),
        )


@dataclass(frozen=True)
class Scene:
    """A scene: 1-4 objects on the world's fixed background."""

    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.objects, tuple):
            object.__setattr__(self, "objects", tuple(self.objects))
        for o in self.objects:
            if not isinstance(o, Obj):
                raise TypeError(f"Scene objects must be Obj, got {type(o).__name__}")

    def __len__(self) -> int:
        return len(self.objects)

    def find(self, spec: ObjSpec) -> list[int]:
        """Indices of the objects that fit `spec`."""
        return [i for i, o in enumerate(self.objects) if spec.matches(o)]

    def resolve(self, spec: ObjSpec) -> int:
        """Index of the one object `spec` refers to; ValueError if none or several fit."""
        hits = self.find(spec)
        if len(hits) != 1:
            raise ValueError(f"{spec} refers to {len(hits)} objects in the scene, expected exactly one")
        return hits[0]

    def reference(self, index: int) -> ObjSpec:
        """The shortest description that names object `index` uniquely: its shape, or colour and shape."""
        o = self.objects[index]
        if sum(p.shape == o.shape for p in self.objects) == 1:
            return ObjSpec(o.shape)
        return ObjSpec(o.shape, o.color)

    def to_dicts(self) -> list[dict]:
        return [o.to_dict() for o in self.objects]

    @classmethod
    def from_dicts(cls, items: Sequence[dict]) -> Scene:
        return cls(tuple(Obj.from_dict(d) for d in items))


def relation(a: Any, b: Any) -> str:
    """Where `a` is relative to `b` along the dominant axis between their centres (y points down)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def is_clear(a: Any, b: Any, ratio: float = CLEAR_RATIO) -> bool:
    """True if the relation between a and b is unambiguous: the dominant offset clearly beats the other."""
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    return max(dx, dy) >= ratio * min(dx, dy) and max(dx, dy) > 0


def _separated(x: float, y: float, r: float, other: Obj) -> bool:
    gap = MIN_GAP + r + other.radius
    return abs(x - other.x) >= gap or abs(y - other.y) >= gap


def _quantize(v: float) -> float:
    return round(v * GRID) / GRID


def sample_position(
    rng: random.Random,
    size: str,
    others: Sequence[Obj],
    anchor: Obj | None = None,
    rel: str | None = None,
    tries: int = 400,
    half: tuple[int, bool] | None = None,
) -> tuple[float, float] | None:
    """A centre for a new object of `size` that overlaps none of `others`, optionally clearly `rel` `anchor`
    and inside `half` of the image (see `centre_half`).

    Returns None when no spot is found (the caller picks another layout).
    """
    r = RADIUS[size]
    lo, hi = r + EDGE_MARGIN, 1.0 - r - EDGE_MARGIN
    for _ in range(tries):
        x, y = _quantize(rng.uniform(lo, hi)), _quantize(rng.uniform(lo, hi))
        x, y = min(max(x, lo), hi), min(max(y, lo), hi)
        if not all(_separated(x, y, r, o) for o in others):
            continue
        if half is not None and not _inside(half, (x, y)[half[0]]):
            continue
        if anchor is not None:
            probe = Obj("circle", "red", size, x, y)
            if relation(probe, anchor) != rel or not is_clear(probe, anchor):
                continue
        return x, y
    return None


def centre_half(rel: str, related: bool) -> tuple[int, bool]:
    """Where an object sits when it and its anchor lie on opposite sides of the image centre along `rel`'s
    axis: (axis, below the centre?), axis 0 for x and 1 for y. `related` is the object that is `rel` the
    other; otherwise it is the anchor."""
    axis = 0 if rel in ("left of", "right of") else 1
    first_low = rel in ("left of", "above")
    return axis, first_low if related else not first_low


def _inside(half: tuple[int, bool], coordinate: float) -> bool:
    return coordinate != 0.5 and (coordinate < 0.5) == half[1]


def _fill_attributes(rng: random.Random, specs: Sequence[ObjSpec], colors: Sequence[str]) -> list[ObjSpec]:
    """Complete partial specs with random colours and sizes, keeping (shape, colour) pairs unique."""
    used = {(s.shape, s.color) for s in specs if s.color is not None}
    if len(used) != sum(s.color is not None for s in specs):
        raise ValueError("a scene cannot hold two objects with the same shape and colour")
    out = []
    for s in specs:
        color = s.color
        if color is None:
            free = [c for c in colors if (s.shape, c) not in used]
            if not free:
                raise ValueError(f"no colour left for another {s.shape}")
            color = rng.choice(free)
            used.add((s.shape, color))
        out.append(ObjSpec(s.shape, color, s.size or rng.choice(SIZES)))
    return out


def random_scene(
    rng: random.Random,
    n_objects: int | None = None,
    *,
    specs: Sequence[ObjSpec] | None = None,
    relations: Sequence[tuple[int, str, int]] = (),
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] = COLORS,
    tries: int = 200,
    across_centre: bool = False,
) -> Scene:
    """Sample a scene of `n_objects` (default 1-4, uniform) non-overlapping objects.

    `specs` fixes some attributes (None fields are drawn at random), `relations` lists (i, rel, j)
    constraints that are placed unambiguously. A two-object scene always gets a clear relation, so that
    its caption can state it. With `across_centre`, each related pair also lies on opposite sides of the
    image centre along its relation's axis.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if specs is not None:
        n_objects = len(specs)
    if n_objects is None:
        n_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    if not MIN_OBJECTS <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [{MIN_OBJECTS}, {MAX_OBJECTS}], got {n_objects}")
    for s in shapes:
        _check(s, SHAPES, "shape")
    for c in colors:
        _check(c, COLORS, "color")
    constraints = {i: (j, rel) for i, rel, j in relations}
    for i, rel, j in relations:
        _check(rel, RELATIONS, "relation")
        if not (0 <= i < n_objects and 0 <= j < n_objects) or i == j or j > i:
            raise ValueError(f"relation ({i}, {rel!r}, {j}) must relate a later object to an earlier one")
    halves: dict[int, tuple[int, bool]] = {}
    if across_centre:
        for i, rel, j in relations:
            if i in halves or j in halves:
                raise ValueError("across_centre needs each object in at most one relation")
            halves[i], halves[j] = centre_half(rel, True), centre_half(rel, False)

    for _ in range(tries):
        if specs is None:
            chosen = [ObjSpec(rng.choice(list(shapes))) for _ in range(n_objects)]
        else:
            chosen = list(specs)
        try:
            filled = _fill_attributes(rng, chosen, colors)
        except ValueError:
            if specs is not None:
                raise
            continue
        placed: list[Obj] = []
        for i, s in enumerate(filled):
            anchor, rel = None, None
            if i in constraints:
                j, rel = constraints[i]
                anchor = placed[j]
            elif n_objects == 2 and i == 1:
                anchor, rel = placed[0], rng.choice(RELATIONS)
            pos = sample_position(rng, s.size, placed, anchor, rel, tries=60, half=halves.get(i))
            if pos is None:
                break
            placed.append(Obj(s.shape, s.color, s.size, *pos))
        if len(placed) == n_objects:
            return Scene(tuple(placed))
    raise ValueError(f"could not place {n_objects} objects after {tries} tries")


@dataclass(frozen=True)
class Change:
    """One step of a story or an edit.

    - ``recolor``: `target` (a reference) takes colour `color`;
    - ``add``: a new object described by `target` appears `relation` the `anchor`;
    - ``remove``: `target` disappears;
    - ``move``: `target` moves so that it is `relation` the `anchor`.
    """

    kind: str
    target: ObjSpec
    color: str | None = None
    relation: str | None = None
    anchor: ObjSpec | None = None

    def __post_init__(self):
        _check(self.kind, CHANGE_KINDS, "change kind")
        if not isinstance(self.target, ObjSpec):
            raise TypeError(f"Change.target must be an ObjSpec, got {type(self.target).__name__}")
        if self.kind == "recolor":
            _check(self.color, COLORS, "color")
        if self.kind in ("add", "move"):
            _check(self.relation, RELATIONS, "relation")
            if not isinstance(self.anchor, ObjSpec):
                raise ValueError(f"a {self.kind} change needs an anchor ObjSpec")

    def apply(self, scene: Scene, rng: random.Random | None = None) -> Scene:
        """The scene after this change. `rng` picks new positions and free attributes (a default
        derived from the change and the scene keeps it deterministic). ValueError if the change does
        not fit the scene (unknown reference, no room, duplicate object).
        """
        if rng is None:
            rng = random.Random(repr((self, scene)))
        objs = list(scene.objects)
        if self.kind == "add":
            if len(objs) >= MAX_OBJECTS:
                raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects")
            anchor = objs[scene.resolve(self.anchor)]
            spec = _fill_attributes(rng, [*(ObjSpec(o.shape, o.color) for o in objs), self.target], COLORS)[-1]
            pos = sample_position(rng, spec.size, objs, anchor, self.relation)
            if pos is None:
                raise ValueError(f"no room for {spec} {self.relation} {self.anchor}")
            return Scene((*objs, Obj(spec.shape, spec.color, spec.size, *pos)))
        i = scene.resolve(self.target)
        if self.kind == "recolor":
            if any(o.shape == objs[i].shape and o.color == self.color for o in objs):
                raise ValueError(f"the scene already has a {self.color} {objs[i].shape}")
            objs[i] = replace(objs[i], color=self.color)
        elif self.kind == "remove":
            if len(objs) <= MIN_OBJECTS:
                raise ValueError("cannot remove the last object")
            del objs[i]
        else:  # move
            j = scene.resolve(self.anchor)
            if i == j:
                raise ValueError("an object cannot move relative to itself")
            others = [o for k, o in enumerate(objs) if k != i]
            pos = sample_position(rng, objs[i].size, others, objs[j], self.relation)
            if pos is None:
                raise ValueError(f"no room to move {self.target} {self.relation} {self.anchor}")
            objs[i] = replace(objs[i], x=pos[0], y=pos[1])
        return Scene(tuple(objs))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "target": self.target.to_dict(),
            "color": self.color,
            "relation": self.relation,
            "anchor": None if self.anchor is None else self.anchor.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Change:
        anchor = d.get("anchor")
        return cls(
            d["kind"],
            ObjSpec.from_dict(d["target"]),
            d.get("color"),
            d.get("relation"),
            None if anchor is None else ObjSpec.from_dict(anchor),
        )


def random_change(rng: random.Random, scene: Scene, kinds: Sequence[str] = CHANGE_KINDS) -> Change:
    """A change that makes sense for `scene`, of one of `kinds` (it may still fail to find room)."""
    n = len(scene)
    feasible = [
        k for k in kinds
        if k == "recolor" or (k == "add" and n < MAX_OBJECTS) or (k in ("remove", "move") and n >= 2)
    ]
    if not feasible:
        raise ValueError(f"none of the change kinds {list(kinds)} fits a scene of {n} objects")
    kind = rng.choice(feasible)
    objs = scene.objects
    i = rng.randrange(n)
    if kind == "recolor":
        free = [c for c in COLORS if not any(o.shape == objs[i].shape and o.color == c for o in objs)]
        return Change("recolor", scene.reference(i), color=rng.choice(free))
    if kind == "remove":
        return Change("remove", scene.reference(i))
    if kind == "add":
        shape = rng.choice(SHAPES)
        free = [c for c in COLORS if not any(o.shape == shape and o.color == c for o in objs)]
        color = rng.choice(free) if rng.random() < 0.75 else None
        size = rng.choice(SIZES) if rng.random() < 0.25 else None
        return Change("add", ObjSpec(shape, color, size), relation=rng.choice(RELATIONS), anchor=scene.reference(i))
    j = rng.choice([k for k in range(n) if k != i])
    current = relation(objs[i], objs[j])
    rel = rng.choice([r for r in RELATIONS if r != current])
    return Change("move", scene.reference(i), relation=rel, anchor=scene.reference(j))
