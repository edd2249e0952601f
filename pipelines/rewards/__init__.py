"""Differentiable rewards for ReNO, one file per reward behind one small interface.

A reward maps images in [-1, 1] (B, 3, H, W, with gradients) and their prompts to a score per image,
higher is better, in its own natural units; ReNO minimises `weight * (offset - score)`, the loss
form of the ReNO code (Eyring et al., 2024). Preprocessing is differentiable tensor work (resize,
center crop, normalise), never a PIL round trip.

    clip         CLIP score, 100 cos(image, text): the tiny CLIP for shapes-64, LAION ViT-H-14 for hub models
    pickscore    PickScore_v1 (a CLIP fine-tuned on human preferences)
    hpsv2        HPS v2.1 (OpenCLIP ViT-H-14 fine-tuned on human preferences); needs open_clip_torch
    imagereward  ImageReward v1.0 (BLIP + MLP head); needs the image-reward package
    contrast     shapes world only: the tiny CLIP's log-probability of the prompt against its near misses
                 (the grammar's prompts one edit away: another count, color, shape, relation or background,
                 or two objects' colors swapped)

Every model is read through pipelines/loading.py (safetensors only). A reward whose package or
weights are missing says exactly what is missing and how to get it.
"""
from __future__ import annotations

import abc
import os
import threading
from pathlib import Path
import torch

from ..registry import ModelSpec, cache_root, in_shapes_world

# name -> (module, default weight in ReNO's loss units)
REWARDS = {"clip": 0.01, "pickscore": 0.05, "hpsv2": 5.0, "imagereward": 1.0, "contrast": 0.03}
SHAPES_REWARDS = {"clip": 0.01}  # the embedded world has one reward model: its tiny CLIP


def local_weights(env: str, name: str) -> Path:
    """Where a converted reward checkpoint lives: $env, else ~/.cache/onestep/rewards/<name> ($ONESTEP_CACHE)."""
    root = cache_root() / "rewards"
    return Path(os.environ.get(env, root / name))


class RewardUnavailable(ValueError):
    """A reward whose package or weights are not on this machine; the message says what to get."""


class Reward(abc.ABC):
    """Base: subclasses set `name`, `offset` and implement `score`."""

    def __init__(self, name: str = "", offset: float = 0.0):
        self.name, self.offset = name, offset

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable score per image (higher is better) of images in [-1, 1] against their prompts."""

    def loss_of(self, score: torch.Tensor) -> torch.Tensor:
        """ReNO's loss form of a score: lower is better."""
        return self.offset - score


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] images -> a vision tower's input: bicubic resize of the short side to `size`, center
    crop to size x size, then (x - mean) / std on [0, 1] values. Differentiable."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        x = torch.nn.functional.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                            mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def parse_weights(text: str) -> dict[str, float]:
    """'clip=1.0,pickscore=0.05' -> {'clip': 1.0, 'pickscore': 0.05}; one-line errors."""
    weights = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(REWARDS)}")
        try:
            weights[name] = float(value) if sep else REWARDS[name]
        except ValueError:
            raise ValueError(f"reward weight {value.strip()[:20]!r} for {name} is not a number") from None
        if not 0 <= weights[name] <= 1000:
            raise ValueError(f"reward weight {weights[name]} for {name} is out of range; allowed: 0 to 1000")
    if not weights or not any(weights.values()):
        raise ValueError("no reward with a positive weight; e.g. clip=0.01 (allowed: " + ", ".join(REWARDS) + ")")
    return weights


def default_weights(spec: ModelSpec) -> dict[str, float]:
    """The embedded world: its tiny CLIP. Hub models: every reward whose package and weights are here."""
    if in_shapes_world(spec):
        return dict(SHAPES_REWARDS)
    found = {name: w for name, w in REWARDS.items() if missing(name, spec) is None}
    if not found:
        raise RewardUnavailable("no reward model is on this machine: " + "; ".join(
            f"{name}: {missing(name, spec)}" for name in REWARDS))
    return found


def missing(name: str, spec: ModelSpec) -> str | None:
    """None when reward `name` can be built for `spec`, else what is missing and how to get it."""
    return _module(name).missing(spec)


_CACHE: dict = {}
_LOCK = threading.RLock()  # a reward may build on another (contrast on clip)


def load(name: str, spec: ModelSpec, device: str = "cpu") -> Reward:
    """Build (once per process) reward `name` for models like `spec`, on `device`."""
    why = missing(name, spec)
    if why:
        raise RewardUnavailable(f"reward {name} is unavailable: {why}")
    key = (name, in_shapes_world(spec), str(device))
    with _LOCK:
        if key not in _CACHE:
            reward = _module(name).build(spec, device)
            for p in reward.parameters() if hasattr(reward, "parameters") else ():
                p.requires_grad_(False)
            _CACHE[key] = reward
        return _CACHE[key]


def _module(name: str):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(REWARDS)}")
    from importlib import import_module

    return import_module(f"{__name__}.{name}")


def clear() -> None:
    """Forget every loaded reward model."""
    with _LOCK:
        _CACHE.clear()
