"""Tiny KL autoencoder (Rombach et al., 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", sec. 3): x -> q(z|x) = N(mu, sigma^2) -> x_hat, trained with

    L = |x - x_hat|_1 + |x - x_hat|_2^2 + beta * KL(q(z|x) || N(0, I)),   beta ~ 1e-6,

on random 32x32 crops of 64x64 shapes renders (3 levels: 64x64 -> 16x16x8). No adversarial or perceptual term: the
world is flat colors, and L1 keeps edges sharp. After training, `scaling_factor` is set to
1/std of the latents so the diffusion model sees unit-variance inputs, as in SD.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..common import optimize, to_tensor, train_loop
from ..data import make_pool, pool


def build_model(cfg) -> AutoencoderKL:
    torch.manual_seed(cfg.seed)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=16, sample_size=64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], per image."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    outs = []
    for k in range(0, len(images), batch):
        outs.append(vae.decode(vae.encode(images[k:k + batch]).latent_dist.mode()).sample)
    return torch.cat(outs).clamp(-1, 1)


def reconstruction_shapeeval(reconstructions: torch.Tensor, prompts: list[str]) -> float:
    """ShapeEval pass rate of reconstructions against the prompts their originals were rendered from."""
    from shapes import judge

    arr = ((reconstructions.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([judge(p, a)[0] for p, a in zip(prompts, arr)]))


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    z = torch.cat([vae.encode(images[k:k + 64]).latent_dist.mode() for k in range(0, len(images), 64)])
    factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel differs from a 4-neighbour (shape boundaries of flat renders), else 0."""
    d = torch.zeros_like(x[:, :1])
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True) > 0.05
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True) > 0.05
    d[..., :, 1:] += dx
    d[..., :, :-1] += dx
    d[..., 1:, :] += dy
    d[..., :-1, :] += dy
    return (d > 0).float()


def train(cfg) -> dict:
    if cfg.init_from:
        vae = AutoencoderKL.from_pretrained(cfg.init_from, use_safetensors=True, dtype=torch.float32)
    else:
        vae = build_model(cfg)
    if cfg.decoder_only:  # keep the latent space: freeze the encoder and its quant conv
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, _ = pool(cfg.data_size, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)

    def step(_):
        x = to_tensor(images[rng.integers(len(images), size=cfg.batch_size)])
        if cfg.crop < 64:  # the autoencoder is convolutional: crops train it as well, 4x cheaper
            y0, x0 = (int(v) for v in rng.integers(0, 64 - cfg.crop + 1, size=2))
            x = x[:, :, y0:y0 + cfg.crop, x0:x0 + cfg.crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        weight = 1 + cfg.edge_weight * edge_map(x) if cfg.edge_weight else 1.0
        rec_loss = (weight * ((rec - x).abs() + (rec - x) ** 2)).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        optimize(opt, loss, vae.parameters())
        return {"loss": loss.item(), "rec": rec_loss.item(), "kl": kl.item(), "lr": opt.param_groups[0]["lr"]}

    result = train_loop(cfg, {"vae": vae}, {"vae": opt}, step)
    vae.eval()
    held = held_out(cfg)
    if not cfg.decoder_only:  # a frozen encoder keeps its latents' scale
        result["scaling_factor"] = set_scaling_factor(vae, held)
    result["psnr"] = float(psnr(reconstruct(vae, held), held).mean())
    result["model"] = vae
    return result


def held_out(cfg) -> torch.Tensor:
    """The renders (never trained on) that set the scaling factor and measure PSNR at a run's end."""
    return to_tensor(make_pool(256, seed=10_000 + cfg.seed)[0])


def export(vae: AutoencoderKL, out_dir: str | Path) -> None:
    vae.save_pretrained(Path(out_dir), safe_serialization=True)
