"""How much of ReNO's trajectory ShapeEval would pass, and how much of it the reward's choice keeps.

    python -m bench.reno_trajectory --prompts FILE [--model shapes-64] [--rewards clip=0.01]
        [--select-by clip,contrast] [--iterations 50] [--seed 0] [--limit N] [--json out.json]
        [--save-iterates iterates.npz]

Every prompt is refined from its seed's noise with ReNO at its default settings (or --iterations /
--rewards), and every iterate is judged by ShapeEval. Reported overall and per category, as pass rates:

    start   the unoptimized image (iterate 0)
    best    the iterate ReNO returns: the lowest weighted reward loss (what `evaluate --reno` scores)
    last    the final iterate
    any     at least one iterate passes: what a perfect choice among the iterates would reach
    mean    the share of passing iterates
    by R    (each --select-by reward R) the iterate R alone scores highest, on the same trajectory

`any` against `best` is what a better-ranking reward could still gain from the same gradient steps,
and `by R` says whether reward R is such a ranker. ShapeEval stays the judge, never a reward.
`--save-iterates` keeps every iterate (uint8 images [prompt, iterate, H, W, 3], ShapeEval's verdicts,
ReNO's choice and the prompts, in one .npz without pickles), so a new ranker can be tried on the same
trajectories without running ReNO again.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from pipelines import registry, rewards
from pipelines.evaluate import read_prompts
from pipelines.reno import RenoConfig, Refinement
from shapes import judge, parse
from training.common import to_tensor


def trajectory(pipe, spec, prompt: str, weights: str | None, config: RenoConfig, seed: int,
               selectors: dict) -> dict:
    """One ReNO run: per iterate, ShapeEval's verdict and each selector reward's score, and the
    iterates themselves (uint8 [iterate, H, W, 3]) under "images"."""
    run = Refinement(pipe, spec, prompt, weights, seed=seed, config=config)
    passed, scores, arrays = [], {name: [] for name in selectors}, []
    for step in run:  # ReNO differentiates inside each step: only the scoring runs without gradients
        arr = np.array(step.image.convert("RGB"))  # a writable copy: torch takes it as is
        arrays.append(arr)
        passed.append(bool(judge(prompt, arr)[0]))
        if selectors:
            x = to_tensor(arr[None])
            with torch.no_grad():
                for name, reward in selectors.items():
                    scores[name].append(float(reward.score(x, [prompt])[0]))
    return {"prompt": prompt, "category": parse(prompt).category, "passed": passed,
            "best_iteration": run.best_iteration, "scores": scores, "images": np.stack(arrays)}


def outcomes(row: dict) -> dict[str, float]:
    passed = row["passed"]
    out = {"start": passed[0], "best": passed[row["best_iteration"]], "last": passed[-1], "any": any(passed),
           "mean": float(np.mean(passed))}
    for name, s in row["scores"].items():
        out[f"by {name}"] = passed[int(np.argmax(s))]
    return {k: float(v) for k, v in out.items()}


def summarize(rows: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        o = outcomes(row)
        groups["all"].append(o)
        groups[row["category"]].append(o)
    return {cat: {k: float(np.mean([o[k] for o in os])) for k in os[0]} | {"prompts": len(os)}
            for cat, os in groups.items()}


def run(prompts: list[str], model_id: str = registry.DEFAULT_MODEL, weights: str | None = None,
        select_by: list[str] = (), config: RenoConfig = RenoConfig(), seed: int = 0, progress=None,
        keep_images: bool = False) -> dict:
    """Every prompt's trajectory and the summary; with `keep_images`, "images" holds each prompt's
    iterates (uint8 [iterate, H, W, 3]), kept out of the rows so they stay JSON."""
    from pipelines import loading

    spec = registry.get(model_id)
    pipe = loading.load_pipeline(model_id)
    selectors = {name: rewards.load(name, spec, str(pipe.unet.device)) for name in select_by}
    rows, images = [], []
    for i, prompt in enumerate(prompts):
        rows.append(trajectory(pipe, spec, prompt, weights, config, seed, selectors))
        iterates = rows[-1].pop("images")  # the rows stay JSON
        if keep_images:
            images.append(iterates)
        if progress:
            progress(i + 1, len(prompts))
    return {"model": model_id, "rewards": weights or "default", "iterations": config.iterations, "seed": seed,
            "summary": summarize(rows), "rows": rows} | ({"images": images} if keep_images else {})


def save_iterates(path: str, rows: list[dict], images: list[np.ndarray]) -> None:
    """Every iterate of every prompt (one iteration budget, so one length), with ShapeEval's verdicts
    and ReNO's choice, as one .npz."""
    np.savez_compressed(path, images=np.stack(images), passed=np.array([r["passed"] for r in rows]),
                        best=np.array([r["best_iteration"] for r in rows]),
                        prompts=np.array([r["prompt"] for r in rows]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reno_trajectory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="a prompt file of the shapes grammar")
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--rewards", default=None, help="ReNO's reward weights, e.g. clip=0.01 (default: the model's)")
    ap.add_argument("--select-by", default="", help="comma list of rewards to choose an iterate by, besides ReNO's")
    ap.add_argument("--iterations", type=int, default=RenoConfig.iterations)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    ap.add_argument("--json", default=None, help="also write the summary and every trajectory here")
    ap.add_argument("--save-iterates", default=None, help="also keep every iterate's image here (.npz)")
    args = ap.parse_args(argv)
    try:
        if args.limit < 0:
            raise ValueError(f"--limit {args.limit} is negative; allowed: 0 (all prompts) or more")
        prompts = read_prompts(args.prompts)[: args.limit or None]
        if args.save_iterates and not args.save_iterates.endswith(".npz"):
            raise ValueError(f"--save-iterates {args.save_iterates!r} must end in .npz (a numpy archive, no pickles)")
        for flag, out in (("--json", args.json), ("--save-iterates", args.save_iterates)):
            if out and not Path(out).resolve().parent.is_dir():  # checked before the run, whose work it would lose
                raise ValueError(f"{flag} {out!r}: folder {str(Path(out).parent)!r} does not exist; create it first")
        if args.rewards:
            rewards.parse_weights(args.rewards)  # a one-line error before any model loads
        res = run(prompts, args.model, args.rewards, [n.strip() for n in args.select_by.split(",") if n.strip()],
                  RenoConfig(iterations=args.iterations).check(), args.seed,
                  progress=lambda i, n: print(f"\r{i}/{n} prompts", end="", file=sys.stderr, flush=True),
                  keep_images=bool(args.save_iterates))
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    columns = list(res["summary"]["all"])
    print(f"{'':<14}" + "".join(f"{c:>12}" for c in columns))
    for cat, row in res["summary"].items():
        print(f"{cat:<14}" + "".join(f"{row[c]:>12.3f}" if c != "prompts" else f"{row[c]:>12d}" for c in columns))
    images = res.pop("images", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.save_iterates:
        save_iterates(args.save_iterates, res["rows"], images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
