"""PickScore (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP ViT-H-14 fine-tuned on human preference
pairs; reward = logit_scale * cos(image, text), which ReNO turns into the loss 30 - reward.
The weights repo carries no tokenizer: it is LAION CLIP ViT-H-14's, as in the PickScore code."""
from __future__ import annotations

from .. import loading
from ..registry import REWARD_MODELS, ModelSpec, in_shapes_world
from .clip import HUB_CLIP, ClipReward

REPO = REWARD_MODELS["pickscore"]


def missing(spec: ModelSpec) -> str | None:
    if in_shapes_world(spec):
        return "PickScore judges photographs; the shapes world uses its own CLIP (reward clip)"
    try:
        loading.check_clip_available(REPO)
        loading.check_clip_available(HUB_CLIP, weights=False)
    except loading.LoadError as e:
        return str(e)
    return None


def build(spec: ModelSpec, device: str) -> ClipReward:
    model, tok = loading.load_clip(REPO, device=device, tokenizer_path=HUB_CLIP)
    # PickScore's reward is the model's own logit scale times the cosine
    return ClipReward(model, tok, name="pickscore", offset=30.0, folder=loading.local_folder(HUB_CLIP),
                      scale=float(model.logit_scale.detach().exp()))
