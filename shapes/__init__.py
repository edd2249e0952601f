"""The embedded shapes-64 world: caption grammar, renderer and the ShapeEval judge (no torch)."""
from .grammar import (CATEGORIES, COLORS, HELDOUT_PAIRS, SHAPES, GrammarError, ObjectSpec, Spec, near_misses,
                      parse, sample_spec, to_prompt)
from .render import PALETTE, render
from .shapeeval import detect, judge, summarize

__all__ = ["CATEGORIES", "COLORS", "HELDOUT_PAIRS", "SHAPES", "GrammarError", "ObjectSpec", "Spec", "near_misses",
           "parse", "sample_spec", "to_prompt", "PALETTE", "render", "detect", "judge", "summarize"]
