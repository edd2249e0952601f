"""Caption grammar of the shapes-64 world: prompt <-> spec, and prompt sampling.

The six categories mirror GenEval's (single object, two objects, counting, colors, position,
color attribution); every prompt may end in `` on a <color> background``. Prompts are lower case.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "heart": "hearts", "cross": "crosses"}
SINGULAR = {v: k for k, v in PLURALS.items()}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "gray")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Compositional held-out split: these (color, shape) pairs are never drawn by the training sampler
# (not even when a prompt leaves the color open); `assets/prompts/heldout.txt` asks for them.
HELDOUT_PAIRS = frozenset({("purple", "star"), ("green", "heart"), ("orange", "cross"),
                           ("pink", "triangle"), ("gray", "circle"), ("yellow", "square")})


class GrammarError(ValueError):
    """A prompt outside the shapes grammar."""


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None = None  # None: any color


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for. `objects` lists each requested object once; counting repeats none."""

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1  # counting prompts: how many of objects[0]
    relation: str | None = None  # position prompts: objects[0] <relation> objects[1]
    background: str | None = None

    def instances(self) -> list[ObjectSpec]:
        """The objects a faithful image contains, one entry per object."""
        return [self.objects[0]] * self.count if self.category == "counting" else list(self.objects)


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_P = "|".join(PLURALS.values())
_OBJ = rf"a (?:({_C}) )?({_S})"
_BG = rf"(?: on a ({_C}) background)?"
_RE_ONE = re.compile(rf"^{_OBJ}{_BG}$")
_RE_TWO = re.compile(rf"^{_OBJ} and {_OBJ}{_BG}$")
_RE_POS = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}{_BG}$")
_RE_COUNT = re.compile(rf"^({'|'.join(NUMBERS)}) (?:({_C}) )?({_P}){_BG}$")

GRAMMAR_HELP = ("allowed: 'a [color] <shape>', 'a [color] <shape> and a [color] <shape>', "
                "'two|three|four [color] <shapes>', 'a [color] <shape> left of|right of|above|below "
                "a [color] <shape>', each optionally followed by ' on a <color> background'; "
                f"shapes: {', '.join(SHAPES)}; colors: {', '.join(COLORS)}")


def parse(prompt: str) -> Spec:
    """Parse a prompt of the grammar into a Spec; raise GrammarError for anything else."""
    text = " ".join(str(prompt).strip().lower().split())
    if m := _RE_ONE.match(text):
        color, shape, bg = m.groups()
        spec = Spec("colors" if color else "single_object", (ObjectSpec(shape, color),), background=bg)
    elif m := _RE_TWO.match(text):
        c1, s1, c2, s2, bg = m.groups()
        cat = "color_attr" if (c1 or c2) else "two_object"
        spec = Spec(cat, (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), background=bg)
    elif m := _RE_POS.match(text):
        c1, s1, rel, c2, s2, bg = m.groups()
        spec = Spec("position", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), relation=rel, background=bg)
    elif m := _RE_COUNT.match(text):
        num, color, plural, bg = m.groups()
        spec = Spec("counting", (ObjectSpec(SINGULAR[plural], color),), count=NUMBERS[num], background=bg)
    else:
        raise GrammarError(f"prompt {prompt[:80]!r} is outside the shapes grammar; {GRAMMAR_HELP}")
    if spec.background and any(o.color == spec.background for o in spec.objects):
        raise GrammarError(f"prompt {prompt[:80]!r} puts an object on a background of its own color; "
                           "an object's color must differ from the background's")
    return spec


def _obj(o: ObjectSpec) -> str:
    return f"a {o.color + ' ' if o.color else ''}{o.shape}"


def to_prompt(spec: Spec) -> str:
    """The canonical prompt of a spec (parse(to_prompt(s)) == s)."""
    bg = f" on a {spec.background} background" if spec.background else ""
    a = spec.objects[0]
    if spec.category in ("single_object", "colors"):
        return _obj(a) + bg
    if spec.category in ("two_object", "color_attr"):
        return f"{_obj(a)} and {_obj(spec.objects[1])}{bg}"
    if spec.category == "position":
        return f"{_obj(a)} {spec.relation} {_obj(spec.objects[1])}{bg}"
    color = a.color + " " if a.color else ""
    return f"{NUMBER_WORDS[spec.count]} {color}{PLURALS[a.shape]}{bg}"


def near_misses(spec: Spec) -> list[Spec]:
    """Every prompt spec one edit away from `spec` that an image of `spec` does not satisfy: another
    color for a colored object or the background, another shape, relation or count, and (for two
    colored objects) the two colors swapped, the classic attribute-binding mistake. Deterministic, in
    a fixed order. Left out: what the grammar refuses (an object on a background of its own color) and
    two objects of one shape, which the sampler never draws and an image of `spec` may well satisfy."""
    objs = spec.objects
    out: list[Spec] = []

    def with_object(i: int, **change) -> Spec:
        return replace(spec, objects=objs[:i] + (replace(objs[i], **change),) + objs[i + 1:])

    for i, o in enumerate(objs):
        out += [with_object(i, shape=s) for s in SHAPES if s != o.shape]
        if o.color:
            out += [with_object(i, color=c) for c in COLORS if c != o.color]
    if len(objs) == 2 and objs[0].color and objs[1].color and objs[0].color != objs[1].color:
        out.append(replace(spec, objects=(replace(objs[0], color=objs[1].color),
                                          replace(objs[1], color=objs[0].color))))
    if spec.relation:
        out += [replace(spec, relation=r) for r in RELATIONS if r != spec.relation]
    if spec.category == "counting":
        out += [replace(spec, count=n) for n in NUMBERS.values() if n != spec.count]
    if spec.background:
        out += [replace(spec, background=c) for c in COLORS if c != spec.background]
    return [s for s in dict.fromkeys(out) if s != spec and _well_formed(s)]


def _well_formed(spec: Spec) -> bool:
    """What the sampler draws: two objects of different shapes, none on a background of its color."""
    if len(spec.objects) == 2 and spec.objects[0].shape == spec.objects[1].shape:
        return False
    return not (spec.background and any(o.color == spec.background for o in spec.objects))


def sample_spec(rng, category: str | None = None, background_prob: float = 0.3,
                color_prob: float = 0.5, exclude_pairs=HELDOUT_PAIRS) -> Spec:
    """Draw a random spec (numpy Generator `rng`) whose colored objects avoid `exclude_pairs`."""
    cat = category or CATEGORIES[rng.integers(len(CATEGORIES))]

    def shape_color(colored: bool, avoid=()):
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))]
            if not colored:
                return ObjectSpec(shape)
            color = COLORS[rng.integers(len(COLORS))]
            if (color, shape) not in exclude_pairs and color not in avoid:
                return ObjectSpec(shape, color)

    def two_distinct(colored: bool):
        a = shape_color(colored)
        while (b := shape_color(colored)).shape == a.shape:
            pass
        return a, b

    count, relation = 1, None
    if cat == "single_object":
        objs = (shape_color(False),)
    elif cat == "colors":
        objs = (shape_color(True),)
    elif cat == "two_object":
        objs = two_distinct(False)
    elif cat == "color_attr":
        objs = two_distinct(True)
    elif cat == "position":
        objs = two_distinct(bool(rng.random() < color_prob))
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    elif cat == "counting":
        objs = (shape_color(bool(rng.random() < color_prob)),)
        count = int(rng.integers(2, 5))
    else:
        raise GrammarError(f"unknown category {cat!r}; allowed: {', '.join(CATEGORIES)}")
    background = None
    if rng.random() < background_prob:
        used = {o.color for o in objs}
        choices = [c for c in COLORS if c not in used]
        background = choices[rng.integers(len(choices))]
    return Spec(cat, tuple(objs), count=count, relation=relation, background=background)
