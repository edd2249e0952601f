"""ShapeEval over a prompt file: generate N images per prompt with any model (or the renderer, the
judge's ceiling) and score them per GenEval category."""
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
    for i, p in enumerate(prompts):
        try:
            parse(p)
        except GrammarError as e:
            raise ValueError(f"line {i + 1} of {path}: {e}") from None
    return prompts


def evaluate(model_id: str, prompts: list[str], images_per_prompt: int = 4, steps: int | None = None, seed: int = 0,
             save_images: str | Path | None = None, progress=None) -> dict:
    """Generate and judge; image j of prompt i uses seed + j (the same noise for every prompt)."""
    from .generation import generate

    specs = [parse(p) for p in prompts]
    out_dir = Path(save_images) if save_images else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    records, seconds = [], 0.0
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        t0 = time.perf_counter()
        if model_id == "renderer":
            images = [render(spec, seed + j) for j in range(images_per_prompt)]
        else:
            res = generate(model_id, prompt, steps=steps, seed=seed, batch_size=images_per_prompt)
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
    summary = summarize([r["category"] for r in records], [r["passed"] for r in records])
    summary.update(model=model_id, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                   mean_seconds_per_image=seconds / max(len(records), 1))
    if out_dir:
        with open(out_dir / "results.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return summary
