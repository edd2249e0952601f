"""Image metrics: CLIP score (Hessel et al., 2021: 100 * max(cos(E_img, E_txt), 0)) and the Fréchet
distance between two sets of CLIP image features (Heusel et al., 2017),

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

used as "distance to the teacher's output distribution" on the same prompts and seeds.
Images enter as uint8 arrays or PIL images; CLIP models as (model, tokenizer) from loading.load_clip.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _pixels(images, model) -> torch.Tensor:
    """uint8 HWC (or PIL) -> CLIP input: [-1, 1] at the vision tower's size (the shapes CLIP's processor)."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    size = model.config.vision_config.image_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.to(next(model.parameters()).device)


@torch.no_grad()
def image_features(clip, images, batch: int = 64) -> np.ndarray:
    model, _ = clip
    feats = []
    for k in range(0, len(images), batch):
        out = model.vision_model(pixel_values=_pixels(images[k:k + batch], model))
        feats.append(model.visual_projection(out.pooler_output).float().cpu())
    return torch.cat(feats).numpy()


@torch.no_grad()
def clip_score(clip, images, prompts: list[str]) -> np.ndarray:
    """Per-image CLIP score against its prompt."""
    model, tok = clip
    img = torch.nn.functional.normalize(torch.from_numpy(image_features(clip, images)), dim=-1)
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(next(model.parameters()).device)
    txt = model.text_projection(model.text_model(ids).pooler_output).float().cpu()
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return (100 * (img * txt).sum(-1).clamp_min(0)).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID reference code does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
