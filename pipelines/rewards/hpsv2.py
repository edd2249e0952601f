"""HPS v2.1 (Wu et al., 2023, "Human Preference Score v2"): OpenCLIP ViT-H-14 fine-tuned on human
preference pairs; reward = cos(image, text), ReNO's loss 1 - reward with weight 5.

Needs the `open_clip_torch` package and the HPS v2.1 weights as .safetensors. The published file
(xswu/HPSv2 HPS_v2.1_compressed.pt) is a pickle, which this app never loads: convert it once, in an
environment you trust, with `safetensors.torch.save_file(torch.load(f)["state_dict"], OUT)`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .. import loading
from ..registry import ModelSpec, in_shapes_world
from . import Reward, local_weights, preprocess
from .clip import CLIP_MEAN, CLIP_STD

ARCH = "ViT-H-14"


def weights_path() -> Path:
    return local_weights("ONESTEP_HPSV2", "HPS_v2.1.safetensors")


def missing(spec: ModelSpec) -> str | None:
    if in_shapes_world(spec):
        return "HPSv2 judges photographs; the shapes world uses its own CLIP (reward clip)"
    if importlib.util.find_spec("open_clip") is None:
        return "needs the open_clip_torch package (pip install open_clip_torch)"
    if not weights_path().is_file():
        return (f"needs HPS v2.1 weights as safetensors at {weights_path()} (or set ONESTEP_HPSV2); the published "
                "HPS_v2.1_compressed.pt is a pickle, which is not loaded: convert it once with safetensors")
    return None


class HpsReward(Reward, torch.nn.Module):
    def __init__(self, model, tokenizer):
        torch.nn.Module.__init__(self)
        Reward.__init__(self, name="hpsv2", offset=1.0)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = preprocess(images.to(device), self.size, CLIP_MEAN, CLIP_STD)
        img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with torch.no_grad():
            txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)).float(), dim=-1)
        return (img * txt).sum(-1)


def build(spec: ModelSpec, device: str) -> HpsReward:
    import open_clip

    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(loading.load_state_dict(weights_path()))
    return HpsReward(model.to(device), open_clip.get_tokenizer(ARCH))
