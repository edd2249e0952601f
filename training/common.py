"""What every training method shares: the shapes data source, the LR schedule, and the step loop
with logging, periodic atomic checkpoints, resume, a wall-time budget and graceful stop on SIGTERM."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shapes import render, sample_spec, to_prompt

from . import checkpoint
from .config import save_json


def render_batch(rng: np.random.Generator, n: int, uncond_prob: float = 0.0):
    """n fresh (image, prompt) pairs of the shapes world; images in [-1, 1], NCHW float32."""
    imgs, prompts = [], []
    for _ in range(n):
        spec = sample_spec(rng)
        imgs.append(render(spec, int(rng.integers(2**31))))
        prompts.append("" if rng.random() < uncond_prob else to_prompt(spec))
    return to_tensor(np.stack(imgs)), prompts


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_grid(images, path: str | Path, columns: int = 8) -> Path:
    """Tile PIL images (or uint8 HWC arrays) into one PNG, `columns` per row; the last row is padded black."""
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
    columns = max(1, min(columns, len(arrays)))
    h, w = arrays[0].shape[:2]
    arrays += [np.zeros((h, w, 3), np.uint8)] * (-len(arrays) % columns)
    rows = [np.concatenate(arrays[r:r + columns], 1) for r in range(0, len(arrays), columns)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.concatenate(rows, 0)).save(tmp)
    os.replace(tmp, path)  # a reader (the Train tab) never sees half a PNG
    return path


def drop_local_paths(folder: str | Path) -> None:
    """Remove diffusers' `_name_or_path` from a saved model folder's configs: it records where the weights
    were loaded from on the machine that saved them (e.g. /tmp/job/...), which means nothing elsewhere."""
    folder = Path(folder)
    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        if path.is_file() and "_name_or_path" in (data := json.loads(path.read_text())):
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_accelerator(cfg, **kwargs):
    """The run's accelerate Accelerator (device, processes), with cfg.mixed_precision resolved."""
    from accelerate import Accelerator

    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mode not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision {cfg.mixed_precision!r}; allowed: auto, no, bf16, fp16")
    return Accelerator(mixed_precision=mode, **kwargs)


def optimize(opt, loss: torch.Tensor, params, max_norm: float = 1.0, accelerator=None) -> None:
    """One optimizer step: fresh gradients of `loss`, their norm clipped to `max_norm` (all of `params`
    together), then the update. `opt` is an optimizer or a list of them (e.g. one per LR). With an
    `accelerator`, its backward (gradient sync across processes, loss scaling) is used."""
    opts = opt if isinstance(opt, (list, tuple)) else [opt]
    params = list(params)
    for o in opts:
        o.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, max_norm)
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    for o in opts:
        o.step()


def lr_factor(cfg, step: int) -> float:
    """The schedule's factor at `step`; a warm start's optimizer is fresh, so its first `warmup` steps
    ramp up to the schedule (whose shape does not depend on where the run started)."""
    ramp = min(1.0, (step - cfg.init_step + 1) / cfg.warmup) if cfg.warmup else 1.0
    start = max(cfg.warmup, cfg.decay_start)
    if step < start:
        return ramp
    progress = min((step - start) / max(cfg.steps - start, 1), 1.0)
    return ramp * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can write a checkpoint before it exits."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, *_):
        self.stop = True


def train_loop(cfg, modules: dict, optimizers: dict, step_fn: Callable[[int], dict],
               extra_state: Callable[[], dict] | None = None, on_resume: Callable[[dict], None] | None = None,
               sample_fn: Callable[[Path, int], None] | None = None, accelerator=None, new: tuple = ()) -> dict:
    """Run `step_fn(step) -> metrics` from the latest complete checkpoint up to cfg.steps.

    `modules` (unwrapped) and `optimizers` are what a checkpoint holds. With an `accelerator`, every
    process resumes from the same checkpoint, only the main one writes checkpoints, logs and samples,
    and all of them agree on stopping (signal or time budget) at the same step. Modules and optimizers
    named in `new` may be missing from the checkpoint resumed (checkpoint.load).
    Returns the last metrics with `finished` True when cfg.steps was reached."""
    run_dir = Path(cfg.run_dir)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(cfg, run_dir / "config.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = cfg.init_step  # a warm start's step; a checkpoint overrides it
    if (last := checkpoint.latest(run_dir)) is not None:
        state = checkpoint.load(last, modules, optimizers, new=new)
        start = state["step"]
        if on_resume:
            on_resume(state)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(cfg, s), last_epoch=-1)
                  for o in optimizers.values()]
    for sch in schedulers:  # fast-forward the schedule to the resumed step
        for group, base in zip(sch.optimizer.param_groups, sch.base_lrs):
            group["lr"] = base * lr_factor(cfg, start)
        sch.last_epoch = start
    flag, t0, metrics, step = StopFlag(), time.time(), {}, start
    log = open(run_dir / "metrics.jsonl", "a") if is_main else None
    try:
        while step < cfg.steps:
            metrics = step_fn(step)
            for sch in schedulers:
                sch.step()
            step += 1
            if log and (step % cfg.log_every == 0 or step == cfg.steps):
                line = {"step": step, "time": round(time.time() - t0, 2),
                        **{k: round(float(v), 6) for k, v in metrics.items()}}
                log.write(json.dumps(line) + "\n")
                log.flush()
                print(json.dumps(line), flush=True)
            stop = bool(flag.stop or (cfg.max_seconds and time.time() - t0 > cfg.max_seconds))
            if accelerator is not None and accelerator.num_processes > 1:
                stop = bool(accelerator.reduce(torch.tensor([float(stop)]), reduction="sum").item() > 0)
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                if is_main:
                    checkpoint.save(run_dir, step, modules, optimizers, extra_state() if extra_state else None,
                                    keep=cfg.keep)
                    if sample_fn is not None:
                        sample_fn(run_dir / "samples", step)
                if accelerator is not None:
                    accelerator.wait_for_everyone()
            if stop:
                break
    finally:
        if log:
            log.close()
    return {**{k: float(v) for k, v in metrics.items()}, "step": step, "finished": step >= cfg.steps}
