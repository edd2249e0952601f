"""CLIP score as a reward (Hessel et al., 2021, "CLIPScore"; used as a ReNO reward by Eyring et al.,
2024): 100 * cos(E_image(x), E_text(prompt)), differentiable in the image.

The embedded world uses its own tiny CLIP (the same model as the CLIP score shown in Compare); hub
models use LAION's CLIP ViT-H-14, as ReNO does. PickScore reuses this class with other weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import loading
from ..registry import REWARD_MODELS, SHAPES_CLIP, ModelSpec, in_shapes_world
from . import Reward, preprocess

HUB_CLIP = REWARD_MODELS["clip"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ClipReward(Reward, torch.nn.Module):
    """scale * cosine similarity between image and text embeddings of a transformers CLIPModel
    (scale 100: the CLIP score; PickScore uses the model's own logit scale)."""

    def __init__(self, model, tokenizer, name: str = "clip", offset: float = 100.0, folder: Path | None = None,
                 scale: float = 100.0):
        torch.nn.Module.__init__(self)
        Reward.__init__(self, name=name, offset=offset)
        self.scale = scale
        self.model, self.tokenizer = model.eval(), tokenizer
        proc = json.loads((folder / "preprocessor_config.json").read_text()) if folder and (folder / "preprocessor_config.json").is_file() else {}
        self.mean, self.std = proc.get("image_mean", CLIP_MEAN), proc.get("image_std", CLIP_STD)
        self.size = model.config.vision_config.image_size
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if todo:
            ids = self.tokenizer(todo, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.model.device)
            feats = self.model.text_projection(self.model.text_model(ids).pooler_output).float()
            self._text.update(zip(todo, torch.nn.functional.normalize(feats, dim=-1)))
        return torch.stack([self._text[p] for p in prompts])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of images in [-1, 1], differentiable."""
        pixels = preprocess(images.to(self.model.device), self.size, self.mean, self.std).to(self.model.dtype)
        img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()
        return torch.nn.functional.normalize(img, dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * (self.image_features(images) * self.text_features(prompts)).sum(-1)


def _source(spec: ModelSpec) -> str | Path:
    return SHAPES_CLIP if in_shapes_world(spec) else HUB_CLIP


def missing(spec: ModelSpec) -> str | None:
    try:
        loading.check_clip_available(_source(spec))
    except loading.LoadError as e:
        return str(e)
    return None


def build(spec: ModelSpec, device: str) -> ClipReward:
    source = _source(spec)
    model, tok = loading.load_clip(source, device=device)
    return ClipReward(model, tok, folder=loading.local_folder(source))
