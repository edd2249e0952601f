"""Deterministic renderer of the shapes-64 world: a Spec (or prompt) + seed -> 64x64 RGB uint8.

Flat shapes on a plain background, anti-aliased by 4x supersampling. Layouts are seeded: the same
(spec, seed) always gives the same pixels. Objects never overlap (ShapeEval can count them) and
never take the background's color.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grammar import COLORS, HELDOUT_PAIRS, Spec, parse

SIZE = 64
_SS = 4  # supersampling factor

PALETTE = {
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (245, 225, 20), "green": (30, 160, 50),
    "blue": (30, 70, 230), "purple": (130, 40, 180), "pink": (250, 140, 200), "white": (250, 250, 250),
    "black": (15, 15, 15), "gray": (128, 128, 128),
}
PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass(frozen=True)
class Placed:
    shape: str
    color: str
    cx: float  # center, pixels
    cy: float
    half: float  # half-size, pixels
    sx: float = 1.0  # aspect jitter
    sy: float = 1.0


def _polygon(u, v, pts) -> np.ndarray:
    """Even-odd point-in-polygon for arrays of points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < xint)
    return inside


_STAR = [(np.cos(a) * r, np.sin(a) * r) for k in range(10)
         for a, r in [(-np.pi / 2 + k * np.pi / 5, 1.0 if k % 2 == 0 else 0.45)]]
_CROSS = [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
          (-1, .3), (-1, -.3), (-.3, -.3)]
_TRIANGLE = [(0, -1), (1, .8), (-1, .8)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in local coordinates (u right, v down, the shape spans about [-1, 1])."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return _polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon(u, v, [(x, y * 1.05 + 0.08) for x, y in _STAR])
    if shape == "cross":
        return _polygon(u, v, _CROSS)
    if shape == "heart":
        x, y = u * 1.2, -(v * 1.25 - 0.15)  # the classic implicit heart, point down
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _sizes(n: int, rng) -> list[float]:
    lo, hi = {1: (8.0, 13.0), 2: (7.0, 11.0), 3: (6.0, 8.5), 4: (5.5, 7.5)}[n]
    return [float(rng.uniform(lo, hi)) for _ in range(n)]


def layout(spec: Spec, seed: int) -> tuple[str, list[Placed]]:
    """Choose background, colors, sizes and positions for a spec. Returns (background, objects)."""
    rng = np.random.default_rng(seed)
    insts = spec.instances()
    named = {o.color for o in insts if o.color}
    if spec.background:
        background = spec.background
    else:
        free = [c for c in COLORS if c not in named]
        background = free[rng.integers(len(free))]

    def pick_color(shape):
        choices = [c for c in COLORS if c != background and (c, shape) not in HELDOUT_PAIRS]
        return choices[rng.integers(len(choices))]

    colors = [o.color or pick_color(o.shape) for o in insts]
    if spec.relation:  # place the reference (objects[1]) first, then objects[0] relative to it
        insts, colors = insts[::-1], colors[::-1]
    for _attempt in range(200):
        halves = _sizes(len(insts), rng)
        placed: list[Placed] = []
        for o, c, h in zip(insts, colors, halves):
            sx, sy = (float(rng.uniform(0.9, 1.1)) for _ in range(2))
            r = h * max(sx, sy) + 0.5
            for _try in range(60):
                if spec.relation and len(placed) == 1:
                    cx, cy = _related(placed[0], spec.relation, h, r, rng)
                else:
                    cx, cy = (float(rng.uniform(r + 1, SIZE - r - 1)) for _ in range(2))
                if not (r + 1 <= cx <= SIZE - r - 1 and r + 1 <= cy <= SIZE - r - 1):
                    continue
                if all(np.hypot(cx - p.cx, cy - p.cy) >= r + p.half * max(p.sx, p.sy) + 3.5 for p in placed):
                    break
            else:
                break
            placed.append(Placed(o.shape, c, cx, cy, h, sx, sy))
        if len(placed) == len(insts):
            if spec.relation:
                placed = placed[::-1]
            return background, placed
    raise RuntimeError(f"could not lay out {spec} (seed {seed})")


def _related(ref: Placed, relation: str, h: float, r: float, rng) -> tuple[float, float]:
    """Place the first object relative to the reference, within +-35 degrees of the axis."""
    dist = float(rng.uniform(ref.half + h + 6, 40))
    ang = float(rng.uniform(-0.6, 0.6))
    dx, dy = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[relation]
    ca, sa = np.cos(ang), np.sin(ang)
    return ref.cx + dist * (dx * ca - dy * sa), ref.cy + dist * (dx * sa + dy * ca)


_GRID = (np.arange(SIZE * _SS, dtype=np.float32) + 0.5) / _SS


def draw(background: str, objects: list[Placed]) -> np.ndarray:
    """Rasterize a layout to a 64x64x3 uint8 image."""
    hi = np.empty((SIZE * _SS, SIZE * _SS, 3), dtype=np.float32)
    hi[:] = PALETTE[background]
    for p in objects:
        r = p.half * max(p.sx, p.sy) + 1
        y0, y1 = max(int((p.cy - r) * _SS), 0), min(int((p.cy + r) * _SS) + 1, SIZE * _SS)
        x0, x1 = max(int((p.cx - r) * _SS), 0), min(int((p.cx + r) * _SS) + 1, SIZE * _SS)
        u = (_GRID[None, x0:x1] - p.cx) / (p.half * p.sx)
        v = (_GRID[y0:y1, None] - p.cy) / (p.half * p.sy)
        u, v = np.broadcast_arrays(u, v)
        hi[y0:y1, x0:x1][shape_mask(p.shape, u, v)] = PALETTE[p.color]
    lo = hi.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    return np.clip(np.rint(lo), 0, 255).astype(np.uint8)


def render(spec: Spec | str, seed: int = 0) -> np.ndarray:
    """Render a spec or a prompt of the grammar; deterministic in (spec, seed)."""
    if isinstance(spec, str):
        spec = parse(spec)
    return draw(*layout(spec, seed))
