"""ShapeEval: an exact, GenEval-like judge of what is in a shapes-64 image.

Detection: every pixel takes the nearest palette color (or none if far from all); the background is
the dominant border color; each connected region of another color that survives a 3x3 erosion is an
object, classified into one of the six shapes by nearest prototype on scale-free mask features
(fill of the bounding box, solidity, aspect, vertical mass balance, widths at top and bottom),
prototypes fitted on the renderer's own objects. Anything too far from every prototype is unknown.

Judging follows GenEval's rules: an object must be present (with its color when named); counting
needs the exact number; position compares box centers with GenEval's 0.1 x size buffer and a 0.5
direction cosine; a named background must be the detected one. Overall accuracy is the unweighted
mean of the per-category accuracies.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .grammar import CATEGORIES, COLORS, SHAPES, ObjectSpec, Spec, parse

COLOR_MAX_DIST = 95.0  # a pixel farther than this from every palette color has no color
MIN_BACKGROUND_FRACTION = 0.35  # of the border pixels
MAX_SHAPE_DIST = 4.0  # in prototype standard deviations
POSITION_BUFFER = 0.1
BLUR_SIGMAS = (0.0, 0.0, 0.6, 0.9, 1.2)  # edge softness the prototypes are fitted on (pixels)


@dataclass(frozen=True)
class Detected:
    shape: str | None  # None: a colored region that is no known shape
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels, exclusive ends)
    area: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a mask (monotone chain)."""
    ys = np.nonzero(mask.any(axis=1))[0]
    pts = set()
    for y in ys:
        xs = np.nonzero(mask[y])[0]
        for x in (xs[0], xs[-1] + 1):
            pts.add((int(x), int(y)))
            pts.add((int(x), int(y) + 1))
    pts = sorted(pts)
    if len(pts) < 3:
        return float(mask.sum())

    def half(points):
        out = []
        for p in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    x = np.array([p[0] for p in hull], dtype=np.float64)
    y = np.array([p[1] for p in hull], dtype=np.float64)
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Scale-free features of a binary object mask (cropped or not)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    area = float(crop.sum())
    rows = crop.sum(axis=1) / w
    quarter = max(h // 4, 1)
    # separate runs per row: two lobes (heart top), two legs (star bottom), one arm (cross); the
    # outermost row is skipped there, since a soft edge leaves it ragged (a triangle's base, say)
    runs = (np.diff(crop.astype(np.int8), axis=1, prepend=0) == 1).sum(axis=1)
    inner = runs[1:-1] if h > 4 else runs
    q_in = max(len(inner) // 4, 1)
    return np.array([
        area / (h * w),  # fill: square 1, circle .79, heart ~.7, cross ~.55, triangle .5, star ~.4
        area / max(_hull_area(crop), 1.0),  # solidity: star and cross are far from convex
        np.log(w / h),
        ((ys - y0 + 0.5).mean() / h) - 0.5,  # vertical mass balance: triangle low, heart high
        rows[:quarter].mean(),  # width at the top: triangle and star narrow there
        rows[-quarter:].mean(),  # width at the bottom: heart narrow
        inner[:q_in].mean() - 1,
        inner[-q_in:].mean() - 1,
        # fill of the bounding box's corner cells (thirds): a cross leaves all four empty, a star's legs
        # reach the bottom ones, a triangle fills the bottom ones, a heart's lobes the top ones
        (crop[: h // 3, : w // 3].mean() + crop[: h // 3, w - w // 3:].mean()) / 2 if h >= 3 and w >= 3 else 0.0,
        (crop[h - h // 3:, : w // 3].mean() + crop[h - h // 3:, w - w // 3:].mean()) / 2 if h >= 3 and w >= 3 else 0.0,
    ])


@lru_cache(maxsize=1)
def _prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of shape_features for each shape, from the renderer's own objects seen
    through the same color labelling as detection (so anti-aliased rims count as they will), sharp
    and blurred: generated images have soft edges, and a slightly rounded square is still a square."""
    from .render import Placed, SIZE, draw

    rng = np.random.default_rng(12345)
    means, stds = [], []
    for shape in SHAPES:
        feats = []
        for _ in range(150):
            half = float(rng.uniform(5.5, 13.0))
            sx, sy = (float(rng.uniform(0.9, 1.1)) for _ in range(2))
            fg, bg = rng.choice(len(COLORS), size=2, replace=False)
            cx, cy = (float(rng.uniform(20, SIZE - 20)) for _ in range(2))
            img = draw(COLORS[bg], [Placed(shape, COLORS[fg], cx, cy, half, sx, sy)]).astype(np.float32)
            sigma = float(rng.choice(BLUR_SIGMAS))
            if sigma:
                img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
            regions, n = ndimage.label(color_labels(img) == fg)
            if n == 0:
                continue
            largest = np.bincount(regions.ravel())[1:].argmax() + 1
            feats.append(shape_features(regions == largest))
        feats = np.array(feats)
        means.append(feats.mean(0))
        stds.append(feats.std(0))
    # a floor on the spread keeps prototypes from being brittle where the renders barely vary;
    # run counts move in steps of whole rows, so theirs is wider
    floor = np.array([0.04] * 6 + [0.15, 0.15, 0.04, 0.04])
    return np.array(means), np.maximum(np.array(stds), floor)


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Nearest prototype (distance in prototype standard deviations); None if too far from all."""
    means, stds = _prototypes()
    d = np.sqrt((((shape_features(mask) - means) / stds) ** 2).mean(axis=1))
    i = int(d.argmin())
    return (SHAPES[i] if d[i] <= MAX_SHAPE_DIST else None), float(d[i])


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel index of the nearest palette color, -1 where no palette color is near."""
    from .render import PALETTE_ARRAY

    px = np.asarray(image, dtype=np.float32)[..., :3]
    d = np.linalg.norm(px[:, :, None, :] - PALETTE_ARRAY[None, None], axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > COLOR_MAX_DIST] = -1
    return labels


def detect(image: np.ndarray) -> tuple[str | None, list[Detected]]:
    """Find the background color and the objects of an RGB image (H, W, 3, uint8)."""
    labels = color_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    if border.size == 0:
        return None, []
    counts = np.bincount(border, minlength=len(COLORS))
    bg = int(counts.argmax())
    if counts[bg] < MIN_BACKGROUND_FRACTION * (4 * labels.shape[0]):
        return None, []
    found = []
    for ci in range(len(COLORS)):
        if ci == bg:
            continue
        regions, n = ndimage.label(labels == ci)
        for k, sl in enumerate(ndimage.find_objects(regions), start=1):
            mask = regions[sl] == k
            # thin rims where two colors blend are not objects; a real object keeps a core
            if ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=0).sum() < 3:
                continue
            shape, _ = classify_shape(mask)
            box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            found.append(Detected(shape, COLORS[ci], box, int(mask.sum())))
    return COLORS[bg], found


def _matches(obj: Detected, want: ObjectSpec) -> bool:
    return obj.shape == want.shape and (want.color is None or obj.color == want.color)


def _relation_holds(a: Detected, b: Detected, relation: str) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    off = np.array([ax - bx, ay - by])
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]])
    revised = np.maximum(np.abs(off) - POSITION_BUFFER * dims, 0) * np.sign(off)
    norm = np.linalg.norm(off)
    if norm < 1e-6 or np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / norm
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def judge(spec: Spec | str, image: np.ndarray) -> tuple[bool, str]:
    """Pass/fail of one image for one prompt, with the reason."""
    if isinstance(spec, str):
        spec = parse(spec)
    background, objs = detect(image)
    if background is None:
        return False, "no plain background found"
    if spec.background and background != spec.background:
        return False, f"background is {background}, wanted {spec.background}"
    shapes_seen = ", ".join(f"{o.color} {o.shape or 'unknown'}" for o in objs) or "nothing"
    if spec.category == "counting":
        want = spec.objects[0]
        n = sum(_matches(o, want) for o in objs)
        if n != spec.count:
            return False, f"found {n} {want.color or ''} {want.shape}(s), wanted {spec.count} (saw {shapes_seen})"
        return True, f"found {n}"
    hits = [[o for o in objs if _matches(o, w)] for w in spec.objects]
    for want, h in zip(spec.objects, hits):
        if not h:
            return False, f"no {want.color + ' ' if want.color else ''}{want.shape} (saw {shapes_seen})"
    if spec.category == "position":
        if not any(_relation_holds(a, b, spec.relation) for a in hits[0] for b in hits[1] if a is not b):
            return False, f"{spec.objects[0].shape} is not {spec.relation} {spec.objects[1].shape}"
    return True, "ok"


def summarize(categories: list[str], passed: list[bool]) -> dict:
    """GenEval-style summary: per-category accuracy and their unweighted mean."""
    per = {}
    for cat in CATEGORIES:
        vals = [p for c, p in zip(categories, passed) if c == cat]
        if vals:
            per[cat] = float(np.mean(vals))
    overall = float(np.mean(list(per.values()))) if per else 0.0
    return {"overall": overall, "per_category": per, "num_images": len(passed)}
