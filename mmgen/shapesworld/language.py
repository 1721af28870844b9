"""ShapesWorld language: seeded, varied phrasing of scenes, questions and changes, and its inverse.

The vocabulary is small and lower case. Sentences end with "." and questions with "?". Every
generator takes an optional `random.Random`: without one it returns the canonical phrasing, with one
it picks among the variants. `parse_caption` and `parse_change` read back every variant produced
here; the benchmark relies on that to read generated text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from ..layout import board_cell
from .scene import COLORS, RELATIONS, SHAPES, SIZES, Change, ObjSpec, Scene, SceneSpec, is_clear, relation

COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
_SINGULAR: dict[str, str] = {p: s for s, p in PLURALS.items()}

# Surface forms of each relation; the first is canonical.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_RELATION_LOOKUP: list[tuple[tuple[str, ...], str]] = sorted(
    ((tuple(p.split()), rel) for rel, phrases in RELATION_PHRASES.items() for p in phrases),
    key=lambda item: -len(item[0]),
)

STORY_CONNECTIVES: tuple[str, ...] = ("then", "next,", "after that,", "now")


def _pick(options: Sequence[str], rng: random.Random | None) -> str:
    return options[0] if rng is None else rng.choice(list(options))


def count_word(n: int) -> str:
    if not 0 <= n < len(COUNT_WORDS):
        raise ValueError(f"no count word for {n}")
    return COUNT_WORDS[n]


def article(words: str) -> str:
    """'a' or 'an', whichever reads right before `words`."""
    return "an" if words[:1] in "aeiou" else "a"


def noun_phrase(obj, with_size: bool = False, definite: bool = False) -> str:
    """'a red circle', 'an orange star', 'a large blue square' or 'the red circle'."""
    words = [w for w in ((obj.size if with_size else None), obj.color, obj.shape) if w]
    body = " ".join(words)
    return f"{'the' if definite else article(body)} {body}"


def reference(spec: ObjSpec) -> str:
    """A definite reference: 'the circle', 'the red circle'."""
    return noun_phrase(spec, with_size=spec.size is not None, definite=True)


def layout_cell(obj) -> str:
    """The board cell of an object's centre ('b3', `board_cell`): mostly two tokens, and one cell is one patch of
    the default model's grid."""
    return board_cell(obj.x, obj.y)


def layout_plan(objects: Sequence, counted: Sequence = ()) -> str:
    """The plan a model writes before it draws: each object, in the order given, with its colour, shape and
    cell ('red circle b3, blue square f3.'). Four objects fit in 21 tokens.

    Each object of `counted` (compared by identity) gets the running count of them after its cell, a tally
    ('red circle b3, blue square f3 one, blue star g5 two.')."""
    entries, tally = [], 0
    for o in objects:
        entry = f"{o.color} {o.shape} {layout_cell(o)}"
        if any(o is c for c in counted):
            tally += 1
            entry += " " + count_word(tally)
        entries.append(entry)
    return ", ".join(entries) + "."


def relation_phrase(rel: str, rng: random.Random | None = None) -> str:
    if rel not in RELATION_PHRASES:
        raise ValueError(f"unknown relation {rel!r}; expected one of {list(RELATIONS)}")
    return _pick(RELATION_PHRASES[rel], rng)


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def reading_order(scene: Scene) -> list[int]:
    """Object indices left to right (then top to bottom): the order of canonical captions."""
    return sorted(range(len(scene)), key=lambda i: (scene.objects[i].x, scene.objects[i].y))


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def describe_scene(
    scene: Scene, rng: random.Random | None = None, size_prob: float = 0.0
) -> tuple[str, list[int]]:
    """The body of a caption, without final period ('a red circle left of a blue square'), and the indices
    of the scene's objects in the order it names them.

    Two-object scenes state their relation when it is unambiguous; larger scenes list their objects.
    `size_prob` is the chance of naming an object's size (only with an rng).
    """
    if len(scene) == 0:
        raise ValueError("cannot describe an empty scene")
    order = reading_order(scene)
    if rng is not None and len(scene) > 1 and rng.random() < 0.3:
        rng.shuffle(order)
    with_size = [rng is not None and rng.random() < size_prob for _ in order]
    phrases = [noun_phrase(scene.objects[i], s) for i, s in zip(order, with_size)]
    if len(scene) == 2:
        a, b = (scene.objects[i] for i in order)
        if is_clear(a, b) and (rng is None or rng.random() < 0.85):
            return f"{phrases[0]} {relation_phrase(relation(a, b), rng)} {phrases[1]}", order
    return _join(phrases), order


def caption(scene: Scene, rng: random.Random | None = None, size_prob: float = 0.2) -> str:
    """A full caption sentence. Without an rng: the canonical form ('a red circle left of a blue square.')."""
    return naming_caption(scene, rng, size_prob)[0]


def naming_caption(
    scene: Scene, rng: random.Random | None = None, size_prob: float = 0.2
) -> tuple[str, list[int]]:
    """`caption`, and the indices of the scene's objects in the order the caption names them."""
    body, order = describe_scene(scene, rng, size_prob if rng is not None else 0.0)
    n = len(scene)
    if rng is None:
        return body + ".", order
    if n == 1:
        forms = ["{b}.", "there is {b}.", "a picture of {b}.", "an image of {b}.", "{b} on a plain background."]
        if body.startswith("a "):
            forms.append("one " + body[2:] + ".")
        return rng.choice(forms).format(b=body), order
    forms = ["{b}.", "there are {n} shapes: {b}.", "{n} shapes: {b}.", "a picture of {b}.", "{n} objects: {b}."]
    return rng.choice(forms).format(b=body, n=count_word(n)), order


def change_sentence(change: Change, rng: random.Random | None = None, imperative: bool = False) -> str:
    """Describe a change, as a statement ('the circle turns blue.') or an instruction ('make the circle blue.')."""
    ref = reference(change.target)
    if change.kind == "recolor":
        forms = (
            ["make {r} {c}.", "paint {r} {c}.", "change the color of {r} to {c}.", "turn {r} {c}."]
            if imperative
            else ["{r} turns {c}.", "{r} becomes {c}.", "{r} changes to {c}."]
        )
        return _pick(forms, rng).format(r=ref, c=change.color)
    if change.kind == "remove":
        forms = (
            ["remove {r}.", "delete {r}.", "take away {r}."]
            if imperative
            else ["{r} disappears.", "{r} vanishes.", "{r} is removed."]
        )
        return _pick(forms, rng).format(r=ref)
    rel = relation_phrase(change.relation, rng)
    anchor = reference(change.anchor)
    if change.kind == "add":
        new = noun_phrase(change.target, with_size=change.target.size is not None)
        forms = (
            ["add {n} {rel} {a}.", "put {n} {rel} {a}.", "draw {n} {rel} {a}."]
            if imperative
            else ["{n} appears {rel} {a}.", "{n} is added {rel} {a}.", "{n} shows up {rel} {a}."]
        )
        return _pick(forms, rng).format(n=new, rel=rel, a=anchor)
    forms = ["move {r} {rel} {a}."] if imperative else ["{r} moves {rel} {a}.", "{r} goes {rel} {a}."]
    return _pick(forms, rng).format(r=ref, rel=rel, a=anchor)


def story_step(change: Change, rng: random.Random | None = None) -> str:
    """A story step after the first: a connective and the change ('then the circle turns blue.')."""
    return f"{_pick(STORY_CONNECTIVES, rng)} {change_sentence(change, rng)}"


# Questions: each returns (question, canonical answer), both full sentences.


def color_question(ref: ObjSpec, color: str, rng: random.Random | None = None) -> tuple[str, str]:
    forms = ["what color is {r}?", "which color does {r} have?", "what is the color of {r}?"]
    return _pick(forms, rng).format(r=reference(ref)), f"{color}."


def shape_question(color: str, shape: str, rng: random.Random | None = None) -> tuple[str, str]:
    forms = ["what shape is the {c} object?", "which shape is {c}?", "what is the shape of the {c} object?"]
    return _pick(forms, rng).format(c=color), f"{shape}."


def presence_question(spec: ObjSpec, present: bool, rng: random.Random | None = None) -> tuple[str, str]:
    forms = ["is there {o}?", "is there {o} in the picture?", "do you see {o}?"]
    return _pick(forms, rng).format(o=noun_phrase(spec)), "yes." if present else "no."


def count_question(
    n: int, shape: str | None = None, color: str | None = None, rng: random.Random | None = None
) -> tuple[str, str]:
    noun = PLURALS[shape] if shape else _pick(["shapes", "objects"], rng)
    what = f"{color} {noun}" if color else noun
    forms = ["how many {w} are there?", "how many {w} are in the picture?", "how many {w} do you see?"]
    return _pick(forms, rng).format(w=what), f"{count_word(n)}."


def what_relation_question(rel: str, anchor: ObjSpec, answer_obj, rng: random.Random | None = None) -> tuple[str, str]:
    forms = ["what is {rel} {a}?", "which object is {rel} {a}?"]
    q = _pick(forms, rng).format(rel=relation_phrase(rel, rng), a=reference(anchor))
    return q, noun_phrase(answer_obj) + "."


def where_question(target: ObjSpec, rel: str, anchor: ObjSpec, rng: random.Random | None = None) -> tuple[str, str]:
    forms = ["where is {t} relative to {a}?", "where is {t} compared to {a}?"]
    q = _pick(forms, rng).format(t=reference(target), a=reference(anchor))
    return q, f"{rel} {reference(anchor)}."


def caption_question(rng: random.Random | None = None) -> str:
    return _pick(["describe the picture.", "what is in the picture?", "what do you see?", "describe the image."], rng)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    text = text.lower().replace("colour", "color")
    return re.findall(r"[a-z]+|[0-9]+|[,:]", text)


class _Reader:
    """A cursor over tokens with the small grammar of ShapesWorld phrases."""

    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"cannot parse {self.text!r}: expected {what} at word {self.i + 1}")

    def peek(self, k: int = 0) -> str | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def done(self) -> bool:
        return self.i >= len(self.toks)

    def accept(self, *words: str) -> bool:
        """Consume the word sequence `words` if it comes next."""
        n = len(words)
        if tuple(self.toks[self.i : self.i + n]) == words:
            self.i += n
            return True
        return False

    def accept_any(self, phrases: Sequence[str]) -> str | None:
        for p in sorted(phrases, key=lambda s: -len(s.split())):
            if self.accept(*p.split()):
                return p
        return None

    def count(self) -> int | None:
        w = self.peek()
        if w is None:
            return None
        if w in COUNT_WORDS[1:5]:
            self.i += 1
            return COUNT_WORDS.index(w)
        if w.isdigit() and 1 <= int(w) <= 4:
            self.i += 1
            return int(w)
        return None

    def relation(self) -> str | None:
        for words, rel in _RELATION_LOOKUP:
            if self.accept(*words):
                return rel
        return None

    def objects(self, allow_plural: bool = True) -> tuple[list[ObjSpec], bool]:
        """[determiner] [size] [color] shape | count [size] [color] shapes -> (specs, definite)."""
        definite = False
        n = 1
        if self.accept("the"):
            definite = True
        elif self.accept("a") or self.accept("an"):
            pass
        else:
            c = self.count()
            if c is not None:
                n = c
        size = self.peek() if self.peek() in SIZES else None
        if size:
            self.i += 1
        color = self.peek() if self.peek() in COLORS else None
        if color:
            self.i += 1
        w = self.peek()
        if w in SHAPES:
            shape = w
        elif w in _SINGULAR and (allow_plural or n > 1):
            shape = _SINGULAR[w]
        else:
            raise self.fail("a shape")
        self.i += 1
        return [ObjSpec(shape, color, size)] * n, definite

    def one_object(self) -> tuple[ObjSpec, bool]:
        specs, definite = self.objects(allow_plural=False)
        if len(specs) != 1:
            raise self.fail("a single object")
        return specs[0], definite

    def color(self) -> str:
        w = self.peek()
        if w not in COLORS:
            raise self.fail("a color")
        self.i += 1
        return w


_CAPTION_PREFIXES = (
    "there is", "there are", "a picture of", "an image of", "a picture with", "draw", "show", "this is",
)


def parse_caption(text: str) -> SceneSpec:
    """Read a caption (or a text-to-image prompt) back into the objects and relations it states.

    ValueError if the text is not a ShapesWorld caption.
    """
    r = _Reader(text)
    r.accept_any(_CAPTION_PREFIXES)
    stated = None
    save = r.i
    n = r.count()
    if n is not None and r.peek() in ("shapes", "objects") and r.peek(1) == ":":
        r.i += 2
        stated = n
    else:
        r.i = save
    specs, _ = r.objects()
    relations: list[tuple[int, str, int]] = []
    rel = r.relation()
    if rel is not None:
        other, _ = r.objects()
        if len(specs) != 1 or len(other) != 1:
            raise r.fail("single objects around a relation")
        specs += other
        relations.append((0, rel, 1))
    else:
        while r.accept(","):
            more, _ = r.objects()
            specs += more
        if r.accept("and"):
            more, _ = r.objects()
            specs += more
    r.accept("on", "a", "plain", "background")
    if not r.done():
        raise r.fail("the end of the caption")
    if stated is not None and stated != len(specs):
        raise ValueError(f"cannot parse {text!r}: it announces {stated} shapes but lists {len(specs)}")
    return SceneSpec(tuple(specs), tuple(relations))


def parse_object(text: str) -> ObjSpec:
    """Read one noun phrase ('a red circle', 'the circle', 'red circle.')."""
    r = _Reader(text)
    spec, _ = r.one_object()
    if not r.done():
        raise r.fail("the end of the phrase")
    return spec


def _expect_end(r: _Reader) -> None:
    if not r.done():
        raise r.fail("the end of the sentence")


def parse_change(text: str) -> Change:
    """Read a change, stated ('then the circle turns blue.') or instructed ('make the circle blue.').

    ValueError if the text is not a ShapesWorld change.
    """
    r = _Reader(text)
    for connective in ("and then", "after that", *STORY_CONNECTIVES):
        if r.accept(*connective.rstrip(",").split()):
            r.accept(",")
            break
    # Instructions.
    if r.accept("make") or r.accept("paint") or r.accept("turn"):
        target, _ = r.one_object()
        change = Change("recolor", target, color=r.color())
    elif r.accept("change", "the", "color", "of"):
        target, _ = r.one_object()
        if not r.accept("to"):
            raise r.fail("'to'")
        change = Change("recolor", target, color=r.color())
    elif r.accept("add") or r.accept("put") or r.accept("draw"):
        target, definite = r.one_object()
        rel = r.relation()
        if rel is None:
            raise r.fail("a relation")
        anchor, _ = r.one_object()
        change = Change("move" if definite else "add", target, relation=rel, anchor=anchor)
    elif r.accept("remove") or r.accept("delete") or r.accept("take", "away") or r.accept("erase"):
        target, _ = r.one_object()
        change = Change("remove", target)
    elif r.accept("move"):
        target, _ = r.one_object()
        rel = r.relation()
        if rel is None:
            raise r.fail("a relation")
        anchor, _ = r.one_object()
        change = Change("move", target, relation=rel, anchor=anchor)
    else:
        # Statements.
        target, definite = r.one_object()
        if not definite:
            if not (r.accept("appears") or r.accept("is", "added") or r.accept("shows", "up")):
                raise r.fail("'appears'")
            rel = r.relation()
            if rel is None:
                raise r.fail("a relation")
            anchor, _ = r.one_object()
            change = Change("add", target, relation=rel, anchor=anchor)
        elif r.accept("turns") or r.accept("becomes") or r.accept("changes", "to") or r.accept("is", "now"):
            change = Change("recolor", target, color=r.color())
        elif r.accept("disappears") or r.accept("vanishes") or r.accept("is", "removed") or r.accept("goes", "away"):
            change = Change("remove", target)
        elif r.accept("moves") or r.accept("goes"):
            rel = r.relation()
            if rel is None:
                raise r.fail("a relation")
            anchor, _ = r.one_object()
            change = Change("move", target, relation=rel, anchor=anchor)
        else:
            raise r.fail("a verb such as 'turns', 'disappears' or 'moves'")
    _expect_end(r)
    return change


_DIGITS = {str(i): w for i, w in enumerate(COUNT_WORDS)}


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer: lower case, no articles or final punctuation, digits as
    words, relation synonyms in canonical form. Used for exact-match scoring."""
    toks = [_DIGITS.get(t, t) for t in _tokens(text) if t not in (",", ":")]
    out: list[str] = []
    i = 0
    while i < len(toks):
        for words, rel in _RELATION_LOOKUP:
            if tuple(toks[i : i + len(words)]) == words:
                out.extend(rel.split())
                i += len(words)
                break
        else:
            if toks[i] not in ("a", "an", "the"):
                out.append(toks[i])
            i += 1
    return " ".join(out)
