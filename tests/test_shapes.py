"""The shapes world: grammar, renderer, ShapeEval."""
import numpy as np
import pytest

from shapes import (CATEGORIES, COLORS, SHAPES, GrammarError, detect, judge, near_misses, parse, render, sample_spec,
                    summarize, to_prompt)
from shapes.grammar import HELDOUT_PAIRS


def test_grammar_round_trip_every_category():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        spec = sample_spec(rng)
        assert parse(to_prompt(spec)) == spec
        seen.add(spec.category)
    assert seen == set(CATEGORIES)


@pytest.mark.parametrize("prompt,category", [
    ("a circle", "single_object"), ("a red star", "colors"), ("a heart and a cross", "two_object"),
    ("three blue squares on a white background", "counting"), ("a triangle above a green circle", "position"),
    ("a pink star and a gray heart", "color_attr"), ("  A  Red   Circle ", "colors")])
def test_parse_categories(prompt, category):
    assert parse(prompt).category == category


@pytest.mark.parametrize("prompt", ["a dog", "five circles", "a red circle on a red background", "a circle near a star",
                                    "", "two circle"])
def test_parser_errors_are_one_line_and_name_the_grammar(prompt):
    with pytest.raises(GrammarError) as e:
        parse(prompt)
    msg = str(e.value)
    assert "\n" not in msg and "shapes grammar" in msg or "own color" in msg


def test_near_misses_are_one_edit_away_and_never_satisfied():
    """Each near miss is a grammar prompt that a faithful image of the original fails (ShapeEval on renders)."""
    names = lambda p: {to_prompt(s) for s in near_misses(parse(p))}  # noqa: E731
    assert names("a circle") == {f"a {s}" for s in SHAPES if s != "circle"}
    two_red = names("two red circles")
    assert len(two_red) == 5 + 9 + 2 and {"three red circles", "four red circles", "two blue circles"} <= two_red
    attr = names("a red circle and a blue square on a green background")
    assert "a blue circle and a red square on a green background" in attr  # the colors swapped
    assert "a red circle and a blue square on a white background" in attr
    assert not any("green circle" in p or "green square" in p or "square and" in p for p in attr)
    assert names("a star left of a heart") >= {f"a star {r} a heart" for r in ("right of", "above", "below")}
    rng = np.random.default_rng(2)
    for k in range(150):
        spec = sample_spec(rng)
        image, misses = render(spec, k), near_misses(spec)
        assert misses and spec not in misses and all(parse(to_prompt(m)) == m for m in misses)
        assert not any(judge(m, image)[0] for m in misses), to_prompt(spec)


def test_renderer_is_deterministic_and_seeded():
    a = render("two red stars on a blue background", 5)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render("two red stars on a blue background", 5))
    assert not np.array_equal(a, render("two red stars on a blue background", 6))


def test_sampler_never_draws_heldout_pairs():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        spec = sample_spec(rng)
        assert not any((o.color, o.shape) in HELDOUT_PAIRS for o in spec.objects)


def test_shapeeval_on_renders_near_perfect():
    rng = np.random.default_rng(2)
    cats, passed = [], []
    for i in range(360):
        spec = sample_spec(rng, category=CATEGORIES[i % len(CATEGORIES)])
        ok, _ = judge(spec, render(spec, i))
        cats.append(spec.category)
        passed.append(ok)
    assert summarize(cats, passed)["overall"] >= 0.98


def test_shapeeval_on_noise_near_zero():
    rng = np.random.default_rng(3)
    passed = [judge(sample_spec(rng), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[0] for _ in range(100)]
    assert np.mean(passed) <= 0.02


def test_shapeeval_rejects_other_prompts_of_same_category():
    rng = np.random.default_rng(4)
    passed = []
    for i in range(120):
        cat = CATEGORIES[i % len(CATEGORIES)]
        want, other = sample_spec(rng, cat), sample_spec(rng, cat)
        if to_prompt(want) != to_prompt(other):
            passed.append(judge(want, render(other, i))[0])
    assert np.mean(passed) <= 0.25


def test_detect_finds_each_shape_and_color():
    for shape in SHAPES:
        for color in ("red", "blue", "white"):
            bg = "black" if color == "white" else "white"
            bg_found, objs = detect(render(f"a {color} {shape} on a {bg} background", 0))
            assert bg_found == bg
            assert [(o.shape, o.color) for o in objs] == [(shape, color)], (shape, color)


def test_judge_position_and_counting_reasons():
    img = render("a red circle left of a blue square", 0)
    assert judge("a red circle left of a blue square", img)[0]
    ok, reason = judge("a red circle right of a blue square", img)
    assert not ok and "right of" in reason
    ok, reason = judge("three red circles", img)
    assert not ok and "found 1" in reason


def test_colors_palette_complete():
    assert len(COLORS) == 10 and len(SHAPES) == 6
