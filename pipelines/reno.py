"""ReNO: reward-based noise optimization (Eyring, Karthik, Roth, Dosovitskiy, Akata, NeurIPS 2024,
arXiv 2406.04312). The one-step (or few-step) generator is frozen; its initial noise eps is the only
variable, moved by gradient descent on

    L(eps) = sum_k w_k (offset_k - reward_k(decode(G(eps, prompt)), prompt))
             + lambda (0.5 ||eps||^2 - (d - 1) log ||eps||),

where the second term (in fp32, lambda = 0.01) is the negative log-density of the norm of a
d-dimensional standard Gaussian: it keeps eps on the shell where Gaussian noise lives. As in the
paper's code: SGD with Nesterov momentum (lr 5, momentum 0.9), the gradient norm clipped to 0.1, 50
evaluations, and the image returned is the best over all iterates, the unoptimized start included,
by the weighted reward loss alone. An update whose gradient is not finite (an fp16 overflow) is
skipped, so one bad step cannot turn the noise into NaN for the rest of the run (the result's
settings count them). Few-step students keep their re-noising noise fixed across iterations (drawn
exactly as `onestep.generate` draws it), so the exported noise reproduces the image.

Budgets: an iteration count and a wall-time limit, whichever ends first; `cancel` is checked after
every iteration, so a cancel stops the run within one iteration. `Refinement` yields every iterate
(image, rewards, noise norm) for live previews; `refine` runs it to the end.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors.torch import save_file

from . import onestep, rewards
from .registry import ModelSpec

MAX_ITERATIONS = 500
MAX_SECONDS = 600.0


@dataclass(frozen=True)
class RenoConfig:
    iterations: int = 50  # evaluations, the start included (so iterations - 1 updates)
    lr: float = 5.0
    momentum: float = 0.9
    grad_clip: float = 0.1
    reg_weight: float = 0.01
    seconds: float = 0.0  # wall-time budget; 0 = iterations only

    def check(self) -> "RenoConfig":
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations {self.iterations!r} is out of range; allowed: 1 to {MAX_ITERATIONS}")
        for name, value, lo, hi in (("learning rate", self.lr, 0.0, 1000.0), ("momentum", self.momentum, 0.0, 0.999),
                                    ("gradient clip", self.grad_clip, 0.0, 1000.0),
                                    ("prior weight", self.reg_weight, 0.0, 100.0),
                                    ("seconds", self.seconds, 0.0, MAX_SECONDS)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"{name} {value!r} is out of range; allowed: {lo:g} to {hi:g}")
        if self.lr <= 0:
            raise ValueError("learning rate must be above 0")
        return self


@dataclass
class RenoStep:
    iteration: int
    image: Image.Image
    rewards: dict  # reward name -> score (its natural units)
    loss: float  # weighted reward loss (the prior excluded): what "best" minimises
    noise_norm: float
    seconds: float  # since the start
    best: bool  # the best so far


@dataclass
class RenoResult:
    initial: Image.Image
    best: Image.Image
    best_iteration: int
    best_noise: torch.Tensor  # (1, C, h, w) fp32 on CPU: `generate(noise=...)` reproduces `best`
    history: list[dict] = field(default_factory=list)  # per iteration: rewards, loss, noise_norm, seconds
    settings: dict = field(default_factory=dict)
    stopped: str = "iterations"  # "iterations" | "time" | "cancelled"
    seconds: float = 0.0


def noise_prior(noise: torch.Tensor) -> torch.Tensor:
    """0.5 ||eps||^2 - (d - 1) log ||eps||, per image, in fp32 (d = elements per image)."""
    flat = noise.float().flatten(1)
    norm = flat.norm(dim=1)
    return 0.5 * norm.pow(2) - (flat.shape[1] - 1) * torch.log(norm)


def load_rewards(spec: ModelSpec, weights: dict | str | None, device) -> dict:
    """{name: (Reward, weight)} from weights ({name: weight} or 'clip=0.01,...'; None = the model's
    defaults), or built rewards given as {name: (Reward, weight)} already."""
    if isinstance(weights, dict) and weights and all(isinstance(v, tuple) for v in weights.values()):
        return dict(weights)
    if isinstance(weights, str):
        weights = rewards.parse_weights(weights)
    weights = weights or rewards.default_weights(spec)
    return {name: (rewards.load(name, spec, device), float(w)) for name, w in weights.items() if w > 0}


class Refinement:
    """One ReNO run. Iterating it yields every iterate (a `RenoStep`); stopping early (a cancel, a
    closed UI event) is simply not asking for the next one. `result()` is valid after the first."""

    def __init__(self, pipe, spec: ModelSpec, prompt: str, weights: dict | str | None = None, *, seed: int = 0,
                 noise: torch.Tensor | None = None, steps: int | None = None, height: int | None = None,
                 width: int | None = None, config: RenoConfig = RenoConfig()):
        self.pipe, self.spec, self.prompt, self.config = pipe, spec, prompt, config.check()
        steps = spec.steps if steps is None else steps
        height = spec.resolution if height is None else height
        width = spec.resolution if width is None else width
        onestep.check_inputs(prompt, steps, height, width, seed, 1)
        if spec.family not in ("sd", "sdxl"):
            raise ValueError(f"ReNO needs a UNet student (SD or SDXL family); {spec.id} is {spec.family}")
        if spec.is_local and (spec.path / "msd.json").is_file():
            raise ValueError("ReNO refines one student; a multi-student (MSD) model routes prompts: pick one of its "
                             "students' folders")
        self.rewards = load_rewards(spec, weights, pipe.unet.device)
        self.timesteps = onestep.resolve_timesteps(spec, steps, None, pipe.scheduler.config.num_train_timesteps)
        shape = onestep.latent_shape(pipe, 1, height, width)
        if noise is None:
            noise = onestep.make_noise(pipe, [seed], height, width)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape}")
        # the re-noising noise of few-step students, drawn exactly as onestep.generate draws it
        gen = torch.Generator().manual_seed(seed + 1)
        self.renoise = [torch.randn(shape, generator=gen) for _ in self.timesteps[1:]]
        self.height, self.width = height, width
        self.eps = torch.nn.Parameter(noise.detach().float().clone().to(pipe.unet.device))
        self.skipped = 0  # updates skipped for a gradient that was not finite
        self.settings = {"model": spec.id, "prompt": prompt, "steps": steps, "seed": seed, "batch_size": 1,
                         "height": height, "width": width, "timesteps": self.timesteps,
                         "reno": {**asdict(config), "rewards": {k: w for k, (_, w) in self.rewards.items()}}}
        self.history: list[dict] = []
        self.stopped = "cancelled"  # until the loop ends by itself
        self._best = None  # (loss, iteration, image, noise)
        self._initial = None
        self._t0 = None

    def __iter__(self):
        pipe, cfg, prompt = self.pipe, self.config, self.prompt
        with torch.no_grad():
            cond = onestep.encode_prompt(pipe, [prompt], self.height, self.width)
        opt = torch.optim.SGD([self.eps], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        self._t0 = time.perf_counter()
        for i in range(cfg.iterations):
            images = onestep.decode(pipe, onestep.denoise(pipe, cond, self.eps, self.timesteps, renoise=self.renoise))
            scores = {name: r.score(images, [prompt]) for name, (r, _) in self.rewards.items()}
            loss = sum(w * r.loss_of(scores[name]) for name, (r, w) in self.rewards.items()).sum()
            image = onestep.to_pil(images)[0]
            record = {"iteration": i, "rewards": {n: float(s.detach()) for n, s in scores.items()},
                      "loss": float(loss.detach()),
                      "noise_norm": float(self.eps.detach().norm()), "seconds": time.perf_counter() - self._t0}
            is_best = self._best is None or record["loss"] < self._best[0]
            if is_best:
                self._best = (record["loss"], i, image, self.eps.detach().cpu().clone())
            if self._initial is None:
                self._initial = image
            self.history.append(record)
            yield RenoStep(i, image, record["rewards"], record["loss"], record["noise_norm"], record["seconds"], is_best)
            if i + 1 == cfg.iterations:
                self.stopped = "iterations"
                break
            if cfg.seconds and time.perf_counter() - self._t0 >= cfg.seconds:
                self.stopped = "time"
                break
            # the noise's gradient alone: the shared, cached model's weights and flags are never touched
            (grad,) = torch.autograd.grad(loss + cfg.reg_weight * noise_prior(self.eps).sum(), [self.eps])
            if not torch.isfinite(grad).all():
                self.skipped += 1
                continue
            if cfg.grad_clip:  # clip the gradient norm, as ReNO does
                grad = grad * (cfg.grad_clip / grad.norm().clamp_min(1e-12)).clamp(max=1.0)
            self.eps.grad = grad
            opt.step()

    @property
    def best_iteration(self) -> int:
        """The best iterate so far (-1 before the first)."""
        return self._best[1] if self._best is not None else -1

    def result(self) -> RenoResult:
        if self._best is None:
            raise ValueError("ReNO has not run an iteration yet")
        _, it, image, noise = self._best
        reno_settings = {**self.settings["reno"], "best_iteration": it, "skipped_updates": self.skipped}
        settings = {**self.settings, "reno": reno_settings}
        return RenoResult(self._initial, image, it, noise, list(self.history), settings, self.stopped,
                          time.perf_counter() - self._t0)


def refine(pipe, spec: ModelSpec, prompt: str, weights: dict | str | None = None, *,
           callback: Callable[[RenoStep], None] | None = None, cancel: Callable[[], bool] | None = None,
           **kwargs) -> RenoResult:
    """Run ReNO to its budget; `callback` sees every iterate, `cancel()` is asked after each one."""
    run = Refinement(pipe, spec, prompt, weights, **kwargs)
    for step in run:
        if callback:
            callback(step)
        if cancel is not None and cancel():
            run.stopped = "cancelled"
            break
    return run.result()


def save_noise(noise: torch.Tensor, settings: dict, path: str | Path) -> Path:
    """The optimized noise as .safetensors with the settings that reproduce the image in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"noise": noise.detach().float().cpu().contiguous()}, str(path),
              metadata={"onestep-settings": json.dumps(settings)})
    return path
