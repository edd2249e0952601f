"""Prompt suites: `python -m shapes.suites` writes assets/prompts/shapeeval.txt and heldout.txt.

shapeeval.txt: 604 distinct prompts in GenEval-like proportions (GenEval's 553: single object 80,
two objects 99, counting 80, colors 94, position 100, color attribution 100). The grammar has only
66 distinct single-object prompts (6 shapes x 11 background choices), so all 66 are used and the
other categories are scaled by ~1.14. No prompt names a held-out (color, shape) pair.

heldout.txt: 120 prompts that each name at least one pair of `HELDOUT_PAIRS`, which the training
sampler never draws: they measure compositional generalisation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .grammar import COLORS, HELDOUT_PAIRS, SHAPES, GrammarError, ObjectSpec, Spec, parse, sample_spec, to_prompt

COUNTS = {"single_object": 66, "two_object": 112, "counting": 92, "colors": 106, "position": 114, "color_attr": 114}
HELDOUT_COUNTS = {"colors": 30, "color_attr": 30, "counting": 30, "position": 30}
PROMPT_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def _named_pairs(spec: Spec) -> set:
    return {(o.color, o.shape) for o in spec.objects if o.color}


def shapeeval_prompts(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    singles = [Spec("single_object", (ObjectSpec(s),), background=bg) for s in SHAPES for bg in (None, *COLORS)]
    out += [to_prompt(s) for s in singles][: COUNTS["single_object"]]
    for cat, n in COUNTS.items():
        if cat == "single_object":
            continue
        seen: set = set()
        while len(seen) < n:
            p = to_prompt(sample_spec(rng, cat, background_prob=0.25))
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def heldout_prompts(seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    pairs = sorted(HELDOUT_PAIRS)
    out: list[str] = []
    for cat, n in HELDOUT_COUNTS.items():
        seen: set = set()
        while len(seen) < n:
            spec = sample_spec(rng, cat, background_prob=0.25, color_prob=1.0, exclude_pairs=frozenset())
            color, shape = pairs[rng.integers(len(pairs))]
            objs = list(spec.objects)
            objs[0] = ObjectSpec(shape, color)
            spec = dataclasses.replace(spec, objects=tuple(objs))
            if spec.background == color or (len(objs) == 2 and objs[1].shape == shape):
                continue
            try:
                p = to_prompt(parse(to_prompt(spec)))
            except GrammarError:
                continue
            if p not in seen and _named_pairs(spec) & HELDOUT_PAIRS:
                seen.add(p)
                out.append(p)
    return out


def main() -> None:
    PROMPT_DIR.mkdir(parents=True, exist_ok=True)
    (PROMPT_DIR / "shapeeval.txt").write_text("\n".join(shapeeval_prompts()) + "\n")
    (PROMPT_DIR / "heldout.txt").write_text("\n".join(heldout_prompts()) + "\n")


if __name__ == "__main__":
    main()
