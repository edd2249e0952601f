"""Does a ReNO reward rank one prompt's images as ShapeEval does?

    python -m bench.reward_rank DIR [--rewards clip,contrast] [--model shapes-64] [--json out.json]

DIR is an `evaluate --save-images` folder (several images per prompt, their pass/fail in
DIR/results.jsonl). For every prompt with both passing and failing images, each (passing, failing)
pair counts as ranked right when the reward scores the passing image higher (a tie counts half).
Reported per reward, overall and per category: that pairwise accuracy (0.5 is chance) and the number
of pairs. ReNO climbs a reward within one prompt, and its best-iterate choice ranks images of one prompt
by it, so this is the accuracy that matters to it (not how well the reward separates prompts).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import registry, rewards
from pipelines.evaluate import read_results
from training.common import to_tensor


def read_groups(folder: Path) -> list[list[dict]]:
    """The images of each prompt that ShapeEval both passed and failed, as results.jsonl rows."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in read_results(folder):
        groups[row["prompt_index"]].append(row)
    return [g for g in groups.values() if 0 < sum(r["passed"] for r in g) < len(g)]


def _images(folder: Path, rows: list[dict]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(folder / f"{r['prompt_index']}_{r['image_index']}.png").convert("RGB"))
              for r in rows]
    return to_tensor(np.stack(arrays))


def pairwise_accuracy(scores: torch.Tensor, passed: list[bool]) -> list[float]:
    """1, 0 or 0.5 (tie) for every (passing, failing) pair of one prompt's images."""
    return [1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            for i, p in enumerate(passed) if p for j, q in enumerate(passed) if not q]


def rank(folder: str | Path, names: list[str], model_id: str = registry.DEFAULT_MODEL) -> dict:
    folder = Path(folder)
    groups = read_groups(folder)
    spec = registry.get(model_id)
    loaded = {n: rewards.load(n, spec) for n in names}
    pairs: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in names}
    with torch.no_grad():
        for rows in groups:
            images, passed = _images(folder, rows), [r["passed"] for r in rows]
            for name, reward in loaded.items():
                right = pairwise_accuracy(reward.score(images, [rows[0]["prompt"]] * len(rows)).cpu(), passed)
                pairs[name]["all"] += right
                pairs[name][rows[0]["category"]] += right
    return {"folder": str(folder), "model": model_id, "prompts": len(groups),
            "rewards": {n: {k: {"accuracy": float(np.mean(v)), "pairs": len(v)} for k, v in p.items()}
                        for n, p in pairs.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reward_rank", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="an `evaluate --save-images` folder")
    ap.add_argument("--rewards", default="clip,contrast", help="comma list of rewards to rank with")
    ap.add_argument("--model", default=registry.DEFAULT_MODEL, help="the model whose rewards to load")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        res = rank(args.folder, [n.strip() for n in args.rewards.split(",") if n.strip()], args.model)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['prompts']} prompts with passing and failing images in {res['folder']}")
    for name, cats in res["rewards"].items():
        print(f"{name:<10} " + "  ".join(f"{k} {v['accuracy']:.3f} ({v['pairs']})" for k, v in cats.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
