"""Training data of the shapes world: pools of (image, prompt) pairs rendered once and cached.

A pool holds pairs: entry 2k+1 differs from entry 2k in exactly one attribute (a color, a shape,
the relation, the count or the background), which gives contrastive training hard negatives.
The training sampler never draws the held-out (color, shape) pairs of `shapes.HELDOUT_PAIRS`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from pipelines.registry import cache_root
from shapes import COLORS, HELDOUT_PAIRS, SHAPES, GrammarError, parse, render, sample_spec, to_prompt
from shapes.grammar import RELATIONS, Spec


def cache_dir() -> Path:
    return cache_root()


def _valid(spec: Spec) -> bool:
    try:
        parse(to_prompt(spec))
    except GrammarError:
        return False
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in spec.objects):
        return False
    return len(spec.objects) < 2 or spec.objects[0].shape != spec.objects[1].shape


def perturb(spec: Spec, rng: np.random.Generator) -> Spec:
    """A valid spec that differs from `spec` in one attribute."""
    for _ in range(50):
        kind = rng.integers(5)
        objs = list(spec.objects)
        i = int(rng.integers(len(objs)))
        if kind == 0 and objs[i].color:
            objs[i] = dataclasses.replace(objs[i], color=COLORS[rng.integers(len(COLORS))])
            new = dataclasses.replace(spec, objects=tuple(objs))
        elif kind == 1:
            objs[i] = dataclasses.replace(objs[i], shape=SHAPES[rng.integers(len(SHAPES))])
            new = dataclasses.replace(spec, objects=tuple(objs))
        elif kind == 2 and spec.relation:
            new = dataclasses.replace(spec, relation=RELATIONS[rng.integers(len(RELATIONS))])
        elif kind == 3 and spec.category == "counting":
            new = dataclasses.replace(spec, count=int(rng.integers(2, 5)))
        elif kind == 4 and spec.background:
            new = dataclasses.replace(spec, background=COLORS[rng.integers(len(COLORS))])
        else:
            continue
        if new != spec and _valid(new):
            return new
    return sample_spec(rng, spec.category)


def make_pool(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Render n (even) images with prompts: pairs of a spec and a one-attribute perturbation."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    prompts = []
    for k in range(0, n, 2):
        spec = sample_spec(rng)
        for j, s in enumerate((spec, perturb(spec, rng))[: n - k]):
            images[k + j] = render(s, int(rng.integers(2**31)))
            prompts.append(to_prompt(s))
    return images, prompts


def pool(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """make_pool, cached under ~/.cache/onestep/data (or $ONESTEP_CACHE) as compressed .npz (no pickle)."""
    path = cache_dir() / "data" / f"shapes-pool-{n}-{seed}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["images"], [str(p) for p in z["prompts"]]
    images, prompts = make_pool(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, prompts=np.array(prompts))
    os.replace(tmp, path)
    return images, prompts
