"""Contrastive CLIP reward for the shapes world: the tiny CLIP's log-probability of the prompt
against its near misses, the prompts one edit away that the image should not satisfy,

    reward(x, p) = log softmax_j( s * cos(E_image(x), E_text(p_j)) )[p],  p_j in {p} + near_misses(p),

with s = exp(logit_scale), CLIP's own temperature: the InfoNCE term CLIP was trained with (Radford et
al., 2021), each prompt scored against its hard negatives as in the tiny CLIP's training batches
(training/methods/clip.py). The plain CLIP score's gradient pulls the image towards the prompt's
embedding in every direction at once; this one pulls it away from the specific mistakes (another
count, color, shape, relation, or the two objects' colors swapped), which is where one-step students
fail. Its loss is -reward (0 when CLIP is sure). A prompt outside the grammar has no near misses: a
one-line error says so. The near misses come from the grammar (`shapes.near_misses`), never from
ShapeEval, which stays a held-out judge.
"""
from __future__ import annotations

import torch

from shapes import GrammarError, near_misses, parse, to_prompt

from .. import loading
from ..registry import SHAPES_CLIP, ModelSpec, in_shapes_world
from . import REWARDS, clip, load  # the package is always loaded before this module
from .clip import ClipReward


class ContrastReward(ClipReward):
    def __init__(self, model, tokenizer, folder=None):
        super().__init__(model, tokenizer, name="contrast", offset=0.0, folder=folder,
                         scale=float(model.logit_scale.detach().exp()))
        self._candidates: dict[str, list[str]] = {}

    def candidates(self, prompt: str) -> list[str]:
        """The prompt (canonical form) first, then its near misses; a one-line error outside the grammar."""
        if prompt not in self._candidates:
            try:
                spec = parse(prompt)
            except GrammarError as e:
                raise ValueError(f"reward contrast scores prompts of the shapes grammar (use clip for others): {e}"
                                 ) from None
            self._candidates[prompt] = [to_prompt(spec)] + [to_prompt(s) for s in near_misses(spec)]
        return self._candidates[prompt]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        img = self.image_features(images)
        out = []
        for feat, prompt in zip(img, prompts):
            logits = self.scale * (self.text_features(self.candidates(prompt)) @ feat)
            out.append(torch.log_softmax(logits, dim=0)[0])
        return torch.stack(out)


def missing(spec: ModelSpec) -> str | None:
    if not in_shapes_world(spec):
        others = ", ".join(name for name in REWARDS if name != "contrast")
        return f"the contrast reward's near misses come from the shapes grammar; hub models use {others}"
    return clip.missing(spec)


def build(spec: ModelSpec, device: str) -> ContrastReward:
    tower = load("clip", spec, device)  # the CLIP reward's model, loaded once per process
    return ContrastReward(tower.model, tower.tokenizer, folder=loading.local_folder(SHAPES_CLIP))
