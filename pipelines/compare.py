"""Student beside its teacher: same prompt, same initial noise, each with its time and scores.

Scores: ShapeEval pass/fail with the reason when the prompt is in the shapes grammar, and a CLIP
score (the tiny CLIP of shapes-64 for models of that world).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import loading, onestep, registry, teacher

STRIP_STEPS = (1, 2, 4)


@dataclass
class Scored:
    image: object  # PIL image
    seconds: float
    label: str
    shapeeval: str = ""  # "pass" / "fail: reason" / "" (prompt outside the grammar)
    clip_score: float | None = None
    timings: dict = field(default_factory=dict)


def _shapeeval(prompt: str, image) -> str:
    from shapes import GrammarError, judge, parse

    try:
        spec = parse(prompt)
    except GrammarError:
        return ""
    ok, reason = judge(spec, np.asarray(image.convert("RGB")))
    return "pass" if ok else f"fail: {reason}"


def _clip_for(spec: registry.ModelSpec):
    """The CLIP scorer for a model's world, or None when none is installed."""
    if registry.in_shapes_world(spec) and (registry.SHAPES_CLIP / "config.json").is_file():
        return _cached_clip()
    return None


_CLIP_CACHE: dict = {}


def _cached_clip():
    if "shapes" not in _CLIP_CACHE:
        _CLIP_CACHE["shapes"] = loading.load_clip(registry.SHAPES_CLIP, device="cpu")
    return _CLIP_CACHE["shapes"]


def _score(spec, prompt: str, item: Scored) -> Scored:
    from .metrics import clip_score

    item.shapeeval = _shapeeval(prompt, item.image)
    clip = _clip_for(spec)
    if clip is not None:
        item.clip_score = float(clip_score(clip, [item.image], [prompt])[0])
    return item


def _negative_label(settings: dict) -> str:
    if not settings.get("negative_prompt"):
        return ""
    if settings["negative_mode"] == "nasa":
        return f" · NASA α {settings['nasa_alpha']:g}"
    return f" · negative by CFG {settings['guidance_scale']:g}"


def compare(student_id: str, prompt: str, *, seed: int = 0, steps: int | None = None, teacher_steps: int | None = None,
            guidance_scale: float | None = None, negative_prompt: str = "", strip: bool = True,
            device: str | None = None, negative_mode: str = "nasa", nasa_alpha: float | None = None) -> dict:
    """Run student and teacher from one noise; returns {'student', 'teacher', 'speedup', 'strip'}.

    A negative prompt reaches the student through `negative_mode` (NASA at `nasa_alpha`, None: the
    model's default, or the CFG baseline) and the teacher through its CFG."""
    onestep.check_negative(negative_mode, nasa_alpha)
    spec = registry.get(student_id)
    if not spec.teacher:
        raise ValueError(f"{student_id} has no teacher to compare with; pick a student with a teacher "
                         f"(e.g. {', '.join(m.id for m in registry.MODELS.values() if m.teacher)[:200]})")
    tspec = registry.get(spec.teacher)
    spipe = loading.load_pipeline(student_id, device=device)
    tpipe = loading.load_pipeline(spec.teacher, device=device)
    height = width = spec.resolution
    noise = onestep.make_noise(spipe, [seed], height, width)
    negative = dict(negative_prompt=negative_prompt, negative_mode=negative_mode, nasa_alpha=nasa_alpha)
    s = onestep.generate(spipe, spec, prompt, steps=steps, seed=seed, height=height, width=width, noise=noise,
                         **negative)
    t = teacher.sample(tpipe, tspec, prompt, negative_prompt=negative_prompt, steps=teacher_steps,
                       guidance_scale=guidance_scale, seed=seed, height=height, width=width, noise=noise)
    out = {
        "student": _score(spec, prompt, Scored(s.images[0], s.timings["total"],
                                               f"{spec.id} · {s.settings['steps']} step(s){_negative_label(s.settings)}",
                                               timings=s.timings)),
        "teacher": _score(tspec, prompt, Scored(t.images[0], t.timings["total"],
                                                f"{tspec.id} · {t.settings['steps']} steps · CFG {t.settings['guidance_scale']}",
                                                timings=t.timings)),
    }
    out["speedup"] = t.timings["total"] / max(s.timings["total"], 1e-9)
    out["strip"] = []
    if strip:
        for n in STRIP_STEPS:
            r = onestep.generate(spipe, spec, prompt, steps=n, seed=seed, height=height, width=width, noise=noise,
                                 timesteps=None, **negative)
            out["strip"].append(_score(spec, prompt, Scored(r.images[0], r.timings["total"], f"{n} step(s)")))
    return out
