"""ControlNet training for an SD/SDXL-family teacher (Zhang, Rao, Agrawala, 2023, "Adding Conditional
Control to Text-to-Image Diffusion Models").

A trainable copy of the teacher UNet's encoder and middle block (`ControlNetModel.from_unet`) reads the
noisy latent plus a control map through a small conditioning encoder; its outputs pass zero-initialised
convolutions and are added to the frozen UNet's skip connections. Training minimises the teacher's own
denoising loss (its prediction type, min-SNR-gamma weighted) on (image, prompt, map) triples, with
half of the prompts dropped so the map alone must carry the layout, as in the paper.

Images: the shapes renderer's cached pool for the embedded world, or a folder of images with
same-name .txt captions. Maps: `pipelines.control.detect` (the same preprocessors the app offers).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler

from pipelines import control, loading, onestep, registry

from ..common import make_accelerator, optimize, train_loop
from ..data import pool
from .teacher import cached_latents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The conditioning encoder downsamples by the VAE's factor: log2(f) stride-2 stages."""
    stages = int(round(math.log2(vae_scale_factor)))
    return (16, 32, 96, 256, 320)[: stages + 1]


def new_controlnet(unet, vae_scale_factor: int) -> ControlNetModel:
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(vae_scale_factor))


def min_snr_weight(alphas_cumprod: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per timestep (Hang et al., 2023) for the teacher's parameterisation;
    v-prediction floors the SNR at 1 so the zero-SNR last step still trains (as the teacher did)."""
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp_min(1e-8)
    if prediction_type == "v_prediction":
        return snr.clamp(min=1.0, max=gamma) / (snr + 1)
    if prediction_type == "epsilon":
        return snr.clamp(max=gamma) / snr.clamp_min(1e-8)
    return snr.clamp(max=gamma)


def folder_data(folder: str, size: int, limit: int) -> tuple[np.ndarray, list[str]]:
    """Images (center-cropped to size x size) and captions from a folder; one-line errors."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"images {folder!r} is neither 'shapes' nor a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    pairs = [(p, p.with_suffix(".txt")) for p in files if p.with_suffix(".txt").is_file()]
    if not pairs:
        raise ValueError(f"{folder} has no images with same-name .txt captions")
    images = np.stack([np.asarray(control.fit(control.read_image(p), size, size)) for p, _ in pairs])
    return images, [t.read_text().strip() for _, t in pairs]


def train(cfg) -> dict:
    if not cfg.teacher:
        raise ValueError("controlnet needs `teacher`: a registry id or a diffusers folder")
    if control.unavailable(cfg.preprocessor):
        raise ValueError(control.unavailable(cfg.preprocessor))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = make_accelerator(cfg)  # a GPU when there is one; `accelerate launch` for several
    device = acc.device
    pipe = loading.load_pipeline(cfg.teacher, device=str(device), dtype=torch.float32, cache=False)
    size = registry.get(cfg.teacher).resolution
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    net = new_controlnet(pipe.unet, pipe.vae_scale_factor).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net_w, opt = acc.prepare(net, opt)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ptype = sched.config.prediction_type
    weight = min_snr_weight(sched.alphas_cumprod, ptype, cfg.snr_gamma).to(device)

    images, prompts = pool(cfg.data_size, seed=cfg.seed + 11) if cfg.images == "shapes" else folder_data(
        cfg.images, size, cfg.data_size)
    latents = cached_latents(pipe.vae, images, Path(cfg.run_dir) / "latents.safetensors").to(device)
    maps = np.stack([control.detect(im, cfg.preprocessor) for im in images])
    rng = np.random.default_rng(cfg.seed + 3 + 7919 * acc.process_index)
    gen = torch.Generator().manual_seed(cfg.seed + 4 + 7919 * acc.process_index)

    def step(i):
        idx = rng.integers(len(prompts), size=cfg.batch_size)
        texts = ["" if rng.random() < cfg.uncond_prob else prompts[j] for j in idx]
        with torch.no_grad():
            cond = onestep.encode_prompt(pipe, texts, size, size)
        z0 = latents[torch.from_numpy(idx).to(device)]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        zt = sched.add_noise(z0, noise, t)
        target = {"epsilon": noise, "v_prediction": sched.get_velocity(z0, noise, t), "sample": z0}[ptype]
        down, mid = net_w(zt, t, encoder_hidden_states=cond.prompt_embeds,
                          controlnet_cond=torch.from_numpy(maps[idx]).permute(0, 3, 1, 2).float().div(255).to(device),
                          added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)
        pred = pipe.unet(zt, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = (weight[t] * F.mse_loss(pred.float(), target, reduction="none").mean((1, 2, 3))).mean()
        optimize(opt, loss, net.parameters(), accelerator=acc)
        return {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]}

    result = train_loop(cfg, {"controlnet": net}, {"controlnet": opt}, step, accelerator=acc)
    result.update(controlnet=net.eval(), pipe=pipe)
    return result


def export(net: ControlNetModel, out_dir: str | Path) -> Path:
    """A diffusers ControlNetModel folder (fp16 weights; loading casts to the run's dtype)."""
    import copy

    copy.deepcopy(net).to(torch.float16).save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)

