"""ShapeEval over a prompt file: generate N images per prompt with any model (or the renderer, the
judge's ceiling) and score them per GenEval category. With ReNO on, every image is refined from its
seed's noise, and both the plain start and the refined image are judged (a paired comparison)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from shapes import GrammarError, judge, parse, render, summarize


def read_prompts(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return check_prompts(prompts, str(path))


def check_prompts(prompts: list[str], where: str) -> list[str]:
    """Every prompt must be in the shapes grammar (ShapeEval judges only those)."""
    for i, p in enumerate(prompts):
        try:
            parse(p)
        except GrammarError as e:
            raise ValueError(f"line {i + 1} of {where}: {e}") from None
    return prompts


def evaluate(model_id: str, prompts: list[str], images_per_prompt: int = 4, steps: int | None = None, seed: int = 0,
             save_images: str | Path | None = None, progress=None, reno=None, rewards=None, control: str | None = None,
             control_model: str = "auto", control_scale: float = 1.0, device: str | None = None,
             budgets: list[int] | None = None) -> dict:
    """Generate and judge; image j of prompt i uses seed + j (the same noise for every prompt).

    `reno` (a RenoConfig) refines every image with `rewards` (None: the model's defaults); the summary
    then holds the refined images' scores, `plain` the unrefined starts', and the ReNO seconds; with
    `budgets` (iteration counts up to reno.iterations) also the scores of the best iterate found within
    each of those budgets, from the same runs.
    `control` (a preprocessor, e.g. "canny") renders a layout for every image from its prompt (seed
    10000 + image number), generates from its map, and adds control consistency to the summary."""
    from .generation import generate

    if control is not None:
        return _evaluate_control(model_id, prompts, images_per_prompt, steps, seed, save_images, progress, control,
                                 control_model, control_scale, device)

    if reno is not None:
        return _evaluate_reno(model_id, prompts, images_per_prompt, steps, seed, save_images, progress, reno, rewards,
                              device, budgets)

    specs = [parse(p) for p in prompts]
    out_dir = _output_dir(save_images)
    records, seconds = [], 0.0
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        t0 = time.perf_counter()
        if model_id == "renderer":
            images = [render(spec, seed + j) for j in range(images_per_prompt)]
        else:
            res = generate(model_id, prompt, steps=steps, seed=seed, batch_size=images_per_prompt, device=device)
            images = [np.asarray(im.convert("RGB")) for im in res.images]
        seconds += time.perf_counter() - t0
        for j, img in enumerate(images):
            ok, reason = judge(spec, img)
            records.append({"prompt_index": i, "image_index": j, "prompt": prompt, "category": spec.category,
                            "passed": ok, "reason": reason})
            if out_dir:
                from PIL import Image

                Image.fromarray(img).save(out_dir / f"{i}_{j}.png")
        if progress:
            progress(i + 1, len(prompts))
    return _summary(records, out_dir, model=model_id, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                    mean_seconds_per_image=seconds / max(len(records), 1))


def _evaluate_reno(model_id, prompts, images_per_prompt, steps, seed, save_images, progress, config, rewards,
                   device=None, budgets=None) -> dict:
    from . import loading, reno
    from .generation import routed
    from .registry import get

    budgets = sorted(set(budgets or ()))
    if not all(1 <= b <= config.iterations for b in budgets):
        raise ValueError(f"budgets {budgets} must be iteration counts from 1 to the run's {config.iterations}")
    out_dir = _output_dir(save_images)
    records, seconds, iterations = [], 0.0, 0
    for i, prompt in enumerate(prompts):
        served = routed(model_id, prompt, device)[0]  # a multi-student model: the student its router picks
        spec, pipe = get(served), loading.load_pipeline(served, device=device)
        spec_i = parse(prompt)
        for j in range(images_per_prompt):
            within, best = {}, []  # the best iterate so far, judged where a budget ends

            def judge_budgets(step):
                if step.best:
                    best[:] = [step.image]
                if step.iteration + 1 in budgets:
                    within[str(step.iteration + 1)] = judge(spec_i, np.asarray(best[0].convert("RGB")))[0]

            res = reno.refine(pipe, spec, prompt, rewards, seed=seed + j, steps=steps, config=config,
                              callback=judge_budgets if budgets else None)
            seconds += res.seconds
            iterations += len(res.history)
            plain_ok, plain_reason = judge(spec_i, np.asarray(res.initial.convert("RGB")))
            ok, reason = judge(spec_i, np.asarray(res.best.convert("RGB")))
            for b in map(str, budgets):  # a run the time budget ended early: its best is the best within b
                within.setdefault(b, ok)
            records.append({"prompt_index": i, "image_index": j, "prompt": prompt, "category": spec_i.category,
                            "passed": ok, "reason": reason, "plain_passed": plain_ok, "plain_reason": plain_reason,
                            "best_iteration": res.best_iteration, "seconds": res.seconds,
                            **({"within": within} if budgets else {})})
            if out_dir:
                res.initial.save(out_dir / f"{i}_{j}_plain.png")
                res.best.save(out_dir / f"{i}_{j}_reno.png")
        if progress:
            progress(i + 1, len(prompts))
    return _summary(records, out_dir, model=model_id, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                    reno={"iterations": config.iterations, "lr": config.lr, "seconds_budget": config.seconds,
                          "rewards": rewards, "mean_seconds_per_image": seconds / max(len(records), 1),
                          "mean_seconds_per_iteration": seconds / max(iterations, 1)},
                    plain=summarize([r["category"] for r in records], [r["plain_passed"] for r in records]),
                    **({"budgets": {b: summarize([r["category"] for r in records], [r["within"][b] for r in records])
                                    for b in map(str, budgets)}} if budgets else {}))


def _evaluate_control(model_id, prompts, images_per_prompt, steps, seed, save_images, progress, preprocessor,
                      control_model, scale, device=None) -> dict:
    """Control consistency = edge F1, precision and recall (1-pixel tolerance) and mean absolute difference
    between the input's control map and the output's, beside ShapeEval of the outputs."""
    from PIL import Image

    from . import control
    from .generation import generate

    out_dir = _output_dir(save_images)
    records, seconds, settings = [], 0.0, {}
    for i, prompt in enumerate(prompts):
        spec = parse(prompt)
        for j in range(images_per_prompt):
            layout = render(spec, 10_000 + i * images_per_prompt + j)
            res = generate(model_id, prompt, steps=steps, seed=seed + j, control_image=layout,
                           preprocessor=preprocessor, control_model=control_model, control_scale=scale, device=device)
            seconds += res.timings["total"]
            settings = res.settings["control"]
            out = np.asarray(res.images[0].convert("RGB"))
            ref_map, out_map, edges = control.follow(layout, out, preprocessor)
            ok, reason = judge(spec, out)
            records.append({"prompt_index": i, "image_index": j, "prompt": prompt, "category": spec.category,
                            "passed": ok, "reason": reason, **edges,
                            "map_l1": float(np.abs(ref_map.astype(np.float32) - out_map).mean() / 255)})
            if out_dir:
                Image.fromarray(np.concatenate([layout, ref_map, out, out_map], 1)).save(out_dir / f"{i}_{j}.png")
        if progress:
            progress(i + 1, len(prompts))
    return _summary(records, out_dir, model=model_id, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                    mean_seconds_per_image=seconds / max(len(records), 1),
                    control={**settings, **{k: float(np.mean([r[k] for r in records]))
                                            for k in (*control.EDGE_KEYS, "map_l1")}})


def read_results(folder: str | Path) -> list[dict]:
    """The rows of an `evaluate --save-images` folder's results.jsonl (image `<prompt_index>_<image_index>.png`
    beside each); a one-line error when the folder has none."""
    path = Path(folder) / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"{folder} has no results.jsonl; make it with: evaluate --save-images {folder}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fd_between(folder_a: str | Path, folder_b: str | Path, clip_path: str | Path | None = None) -> dict:
    """Fréchet distance in the tiny CLIP's image features between two `evaluate --save-images` folders
    made on the same prompts and seeds (e.g. a student's and its teacher's): the distance to the
    teacher's output distribution. Image pairs are matched by (prompt, image index)."""
    from PIL import Image

    from . import loading, metrics
    from .registry import SHAPES_CLIP

    def read(folder):
        return {(r["prompt"], r["image_index"]): Path(folder) / f"{r['prompt_index']}_{r['image_index']}.png"
                for r in read_results(folder)}

    a, b = read(folder_a), read(folder_b)
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        raise ValueError(f"{folder_a} and {folder_b} share {len(keys)} (prompt, image) pairs; the Fréchet distance "
                         "needs at least 2: evaluate both on the same prompt file and images per prompt")
    clip = loading.load_clip(clip_path or SHAPES_CLIP, device="cpu")
    feats = [metrics.image_features(clip, [np.asarray(Image.open(d[k]).convert("RGB")) for k in keys]) for d in (a, b)]
    return {"fd": metrics.frechet_distance(*feats), "pairs": len(keys), "a": str(folder_a), "b": str(folder_b)}


def _output_dir(save_images) -> Path | None:
    out_dir = Path(save_images) if save_images else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _summary(records: list[dict], out_dir: Path | None, **fields) -> dict:
    """Per-category pass rates of `records` plus `fields`; the records go to out_dir/results.jsonl."""
    summary = summarize([r["category"] for r in records], [r["passed"] for r in records])
    summary.update(fields)
    if out_dir:
        with open(out_dir / "results.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return summary
