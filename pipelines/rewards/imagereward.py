"""ImageReward v1.0 (Xu et al., 2023): BLIP image-text encoder with an MLP head trained on human
rankings, normalised reward (r - mean) / std; ReNO's loss 2 - reward with weight 1. The text is
truncated to 35 tokens, as in ReNO.

Needs the `image-reward` package (module ImageReward) and its weights as .safetensors: the
published ImageReward.pt is a pickle, which this app never loads; convert it once with safetensors,
in an environment you trust, next to the package's med_config.json.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .. import loading
from ..registry import ModelSpec, in_shapes_world
from . import Reward, local_weights, preprocess
from .clip import CLIP_MEAN, CLIP_STD


def folder() -> Path:
    return local_weights("ONESTEP_IMAGEREWARD", "ImageReward")


def missing(spec: ModelSpec) -> str | None:
    if in_shapes_world(spec):
        return "ImageReward judges photographs; the shapes world uses its own CLIP (reward clip)"
    if importlib.util.find_spec("ImageReward") is None:
        return "needs the image-reward package (pip install image-reward)"
    for name in ("ImageReward.safetensors", "med_config.json"):
        if not (folder() / name).is_file():
            return (f"needs {name} in {folder()} (or set ONESTEP_IMAGEREWARD); the published ImageReward.pt is a "
                    "pickle, which is not loaded: convert it once with safetensors")
    return None


class ImageRewardReward(Reward, torch.nn.Module):
    def __init__(self, model):
        torch.nn.Module.__init__(self)
        Reward.__init__(self, name="imagereward", offset=2.0)
        self.model = model.eval()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tok = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                        return_tensors="pt").to(device)
        pixels = preprocess(images.to(device), 224, CLIP_MEAN, CLIP_STD)
        return self.model.score_gard(tok.input_ids, tok.attention_mask, pixels).view(-1).float()


def build(spec: ModelSpec, device: str) -> ImageRewardReward:
    from ImageReward.ImageReward import ImageReward

    model = ImageReward(med_config=str(folder() / "med_config.json"), device=device)
    missing, unexpected = model.load_state_dict(loading.load_state_dict(folder() / "ImageReward.safetensors"),
                                                strict=False)
    if missing:  # a partial conversion would score with random weights: refuse it
        raise loading.LoadError(f"ImageReward.safetensors lacks {len(missing)} weights (e.g. {missing[0]}); "
                                "convert the whole ImageReward.pt state dict")
    return ImageRewardReward(model.to(device))
