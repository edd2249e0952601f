"""NASA removal benchmark on the shapes world: does a one-step student leave out what the negative
prompt names, and what does that cost?

    python -m bench.nasa [--model shapes-64] [--images 500] [--nasa-alpha 0.5[,1.0,...]]
        [--negative-template "{0}, on a {0} background"] [--json out.json]

Cases: prompts of the shapes grammar that leave color open (`a circle`, `a star and a heart`,
`two squares`; background unnamed too), each with a negative prompt naming one color (`red`). Every
mode draws each case from the same seed, so the modes differ only in how the negative is used:
no negative prompt, the CFG-style baseline (x0 extrapolated at `--guidance-scale`), and NASA at each
alpha. Per mode, ShapeEval's detector reports

- appears: how often the named color is in the picture (an object, or the background, of that color);
- removed: of the cases where it appeared without a negative prompt, how often it is gone (also
  counted on objects only and on the background only);
- shapeeval: ShapeEval accuracy on what the prompt does specify (shapes and counts), and its drop
  against no negative prompt;

`--negative-template` words the negative around the color (`{0}`): shapes-64's captions name a color
only on an object or as `on a <color> background`, so its student reads a bare `red` as red objects and
needs `red, on a red background` to keep a red background out as well.

Timing gives the seconds per image of NASA and of CFG as ratios to plain generation (same prompt,
same batch, same process, interleaved repeats, on PyTorch). Issue #7's target: NASA removed >= 0.95 with a
ShapeEval drop <= 0.05.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from pipelines import generation, onestep, registry
from shapes import COLORS, SHAPES, ObjectSpec, Spec, detect, judge, to_prompt

TARGET_REMOVED, TARGET_DROP = 0.95, 0.05


@dataclass(frozen=True)
class Case:
    prompt: str
    negative: str  # one color word
    seed: int


def open_color_prompts() -> list[str]:
    """Prompts that name shapes (and counts) but no color: single objects, pairs, and twos."""
    specs = [Spec("single_object", (ObjectSpec(s),)) for s in SHAPES]
    specs += [Spec("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in combinations(SHAPES, 2)]
    specs += [Spec("counting", (ObjectSpec(s),), count=2) for s in SHAPES]
    return [to_prompt(s) for s in specs]


def make_cases(images: int, seed: int = 0) -> tuple[list[Case], int]:
    """At least `images` cases: every (prompt, color) pair gets the same number of consecutive seeds, its
    own (no two cases share a noise, so each pair is a fresh draw of that prompt, and one generate call per
    pair draws them all; another `seed` draws other noises); below one seed per pair, a shuffled subset of
    the pairs. Returns (cases, seeds per pair)."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a whole number of at least 1, got {str(images)[:40]!r}")
    pairs = [(p, c) for p in open_color_prompts() for c in COLORS]
    order = np.random.default_rng(seed).permutation(len(pairs))
    per_pair = math.ceil(images / len(pairs))
    chosen = [pairs[i] for i in order[:images]] if per_pair == 1 else pairs
    first = seed * len(chosen) * per_pair
    return [Case(p, c, first + i * per_pair + k) for i, (p, c) in enumerate(chosen) for k in range(per_pair)], per_pair


def check_template(template: str) -> str:
    """The negative template, or a one-line ValueError: it must hold `{0}` (the color) and nothing else in braces."""
    try:
        ok = "{0}" in template and template.format("red") == template.replace("{0}", "red")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"negative template {template[:60]!r} must hold {{0}} (the color) and no other braces, "
                         "e.g. '{0}, on a {0} background'")
    return template


def _draw(model_id: str, prompt: str, seed: int, n: int, device, **negative) -> list[np.ndarray]:
    """n images from seeds seed..seed+n-1, in batches of at most onestep.MAX_BATCH."""
    out = []
    for start in range(0, n, onestep.MAX_BATCH):
        res = generation.generate(model_id, prompt, seed=seed + start, batch_size=min(onestep.MAX_BATCH, n - start),
                                  device=device, **negative)
        out += [np.asarray(im.convert("RGB")) for im in res.images]
    return out


def _score(cases: list[Case], images: list[np.ndarray]) -> list[dict]:
    rows = []
    for case, img in zip(cases, images):
        background, objects = detect(img)
        on_object = any(o.color == case.negative for o in objects)
        rows.append({"color": case.negative, "appears": on_object or background == case.negative,
                     "object": on_object, "background": background == case.negative,
                     "shapeeval": judge(case.prompt, img)[0]})
    return rows


def _summary(rows: list[dict], plain: list[dict] | None) -> dict:
    out = {"appears": float(np.mean([r["appears"] for r in rows])),
           "appears_object": float(np.mean([r["object"] for r in rows])),
           "shapeeval": float(np.mean([r["shapeeval"] for r in rows]))}
    if plain is not None:
        had = [r for r, p in zip(rows, plain) if p["appears"]]
        out["removed"] = float(np.mean([not r["appears"] for r in had])) if had else None
        out["removable_cases"] = len(had)
        for where in ("object", "background"):  # the same, counting only objects / only the background
            had = [r for r, p in zip(rows, plain) if p[where]]
            out[f"removed_{where}"] = float(np.mean([not r[where] for r in had])) if had else None
        out["shapeeval_drop"] = float(np.mean([p["shapeeval"] for p in plain])) - out["shapeeval"]
        by_color: dict[str, list[bool]] = {}
        for r in (r for r, p in zip(rows, plain) if p["appears"]):
            by_color.setdefault(r["color"], []).append(not r["appears"])
        out["removed_by_color"] = {c: float(np.mean(v)) for c, v in sorted(by_color.items())}
    return out


def _timing(model_id: str, alpha: float, guidance_scale: float, batch: int, repeats: int, device,
            engine: str | None = None, negative: str = "red") -> dict:
    """Seconds per image, plain vs NASA vs CFG, interleaved so drift hits all three alike (on `engine`:
    generation.generate's auto / torch / onnx; `python -m bench` runs it on each)."""
    runs = {"plain": {}, "nasa": dict(negative_prompt=negative, negative_mode="nasa", nasa_alpha=alpha),
            "cfg": dict(negative_prompt=negative, negative_mode="cfg", guidance_scale=guidance_scale)}
    times: dict = {k: {"total": [], "denoising": []} for k in runs}
    for r in range(repeats + 1):
        for name, kwargs in runs.items():
            t = generation.generate(model_id, "a circle", seed=r, batch_size=batch, device=device, engine=engine,
                                    **kwargs).timings
            if r:  # the first round warms up (lazy init, caches)
                times[name]["total"].append(t["total"])
                times[name]["denoising"].append(t["denoising"])
    med = {k: {s: statistics.median(v[s]) for s in v} for k, v in times.items()}
    return {"batch": batch, "repeats": repeats, "nasa_alpha": alpha,
            **{f"{k}_seconds_per_image": med[k]["total"] / batch for k in runs},
            "nasa_ratio": med["nasa"]["total"] / med["plain"]["total"],
            "cfg_ratio": med["cfg"]["total"] / med["plain"]["total"],
            "nasa_denoising_ratio": med["nasa"]["denoising"] / med["plain"]["denoising"],
            "cfg_denoising_ratio": med["cfg"]["denoising"] / med["plain"]["denoising"]}


def removal_benchmark(model_id: str = registry.DEFAULT_MODEL, images: int = 500, nasa_alphas=None,
                      guidance_scale: float = 2.0, seed: int = 0, timing_batch: int = 8, repeats: int = 5,
                      device: str | None = None, progress=None, negative_template: str = "{0}") -> dict:
    """Run every mode over the same cases; see the module docstring for what each number means."""
    check_template(negative_template)
    spec = registry.get(model_id)
    if spec.role != "student":
        raise ValueError(f"{model_id} is a {spec.role}; the NASA benchmark needs a one- or few-step student")
    alphas = [spec.offered_nasa_alpha] if nasa_alphas is None else list(nasa_alphas)
    for a in alphas:
        onestep.check_negative("nasa", a)
    cases, per_pair = make_cases(images, seed)
    say = progress or (lambda msg: None)

    def run_mode(**negative) -> list[dict]:
        imgs = []
        for k in range(0, len(cases), per_pair):  # the cases of one (prompt, color) pair are consecutive
            c = cases[k]
            worded = dict(negative_prompt=negative_template.format(c.negative)) if negative else {}
            imgs += _draw(model_id, c.prompt, c.seed, per_pair, device, **worded, **negative)
        return _score(cases, imgs)

    plain = run_mode()  # no negative prompt: the same seeds
    say(f"no negative: {len(cases)} cases")
    modes = [{"mode": "none", **_summary(plain, None)}]
    rows = run_mode(negative_mode="cfg", guidance_scale=guidance_scale)
    modes.append({"mode": "cfg", "guidance_scale": guidance_scale, **_summary(rows, plain)})
    say(f"cfg: {len(cases)} cases")
    for a in alphas:
        rows = run_mode(negative_mode="nasa", nasa_alpha=a)
        m = {"mode": "nasa", "nasa_alpha": a, **_summary(rows, plain)}
        m["target_met"] = m["removed"] is not None and m["removed"] >= TARGET_REMOVED and m["shapeeval_drop"] <= TARGET_DROP
        modes.append(m)
        say(f"nasa alpha {a:g}: {len(cases)} cases")
    # on PyTorch, where every mode runs (`python -m bench` times each engine)
    timing = _timing(model_id, alphas[0], guidance_scale, timing_batch, repeats, device, engine="torch",
                     negative=negative_template.format("red"))
    return {"model": model_id, "steps": spec.steps, "images": len(cases), "seeds_per_pair": per_pair,
            "prompts": len({c.prompt for c in cases}), "negative_template": negative_template, "modes": modes,
            "timing": timing,
            "target": {"removed": TARGET_REMOVED, "shapeeval_drop": TARGET_DROP}}


def _alphas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a comma-separated list of numbers") from None


def _mode_name(m: dict) -> str:
    if m["mode"] == "none":
        return "no negative"
    return f"cfg w={m.get('guidance_scale', 0):g}" if m["mode"] == "cfg" else f"nasa a={m.get('nasa_alpha', 0):g}"


def _print(res: dict) -> None:
    print(f"{res['model']}: {res['images']} images per mode ({res['prompts']} color-free prompts x a named color; "
          f"negative {res['negative_template'].format('<color>')!r})")
    print(f"{'mode':<16} {'appears':>8} {'removed':>8} {'objects':>8} {'backgr.':>8} {'shapeeval':>10} {'drop':>7}")
    for m in res["modes"]:
        name = _mode_name(m)
        removed = ["-" if m.get(k) is None else f"{m[k]:.3f}" for k in ("removed", "removed_object", "removed_background")]
        drop = "-" if "shapeeval_drop" not in m else f"{m['shapeeval_drop']:+.3f}"
        print(f"{name:<16} {m['appears']:>8.3f} {removed[0]:>8} {removed[1]:>8} {removed[2]:>8} {m['shapeeval']:>10.3f} {drop:>7}")
    for m in res["modes"][1:]:
        print(f"removed by color, {_mode_name(m)}: " + ", ".join(f"{c} {v:.2f}" for c, v in m["removed_by_color"].items()))
    t = res["timing"]
    print(f"time per image vs plain (batch {t['batch']}): NASA x{t['nasa_ratio']:.3f} "
          f"(denoising x{t['nasa_denoising_ratio']:.3f}), CFG x{t['cfg_ratio']:.3f} "
          f"(denoising x{t['cfg_denoising_ratio']:.3f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nasa", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=registry.DEFAULT_MODEL, help="registry id or a student folder")
    ap.add_argument("--images", type=int, default=500, help="cases per mode (rounded up to whole seeds per pair)")
    ap.add_argument("--nasa-alpha", type=_alphas, default=None, help="one alpha or a list, e.g. 0.5,1 (default: the model's)")
    ap.add_argument("--guidance-scale", type=float, default=2.0, help="of the CFG-style baseline")
    ap.add_argument("--negative-template", default="{0}", help="the negative prompt around the color {0}, "
                    "e.g. '{0}, on a {0} background' (default: the bare color)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        res = removal_benchmark(args.model, args.images, args.nasa_alpha, args.guidance_scale, args.seed,
                                args.timing_batch, args.repeats, args.device,
                                progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                                negative_template=args.negative_template)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
