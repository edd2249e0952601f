"""Tiny decoder: a TAESD-style decoder (Boer Bohan, 2023, "TAESD: Tiny AutoEncoder for Stable
Diffusion", github.com/madebyollin/taesd) distilled from a trained AutoencoderKL's decoder D_KL:

    L = E_z [ w * ( |D_tiny(z / s) - D_KL(z / s_KL)|_1 + |D_tiny(z / s) - D_KL(z / s_KL)|_2^2 ) ],
    w = 1 + edge_weight * edges(D_KL(z / s_KL)),

where z are the unit-variance latents the UNet works in (z = s_KL * mode of q(z|x)) and s is the tiny
decoder's own `scaling_factor`, so `onestep.decode` (vae.decode(z / vae.config.scaling_factor)) runs
either decoder unchanged. The target is the KL decoder's output, not the rendered image: the student's
latents are not encodings of any render, and what it should reproduce there is what the full VAE
draws. For the same reason part of the latents are moved off the encoder's outputs by Gaussian noise
(std up to `perturb_sigma` in z units) and decoded by D_KL. Latents and D_KL targets are computed once
per run and kept beside it (safetensors; targets as 8-bit images, the precision they are shown at).

The model is a diffusers AutoencoderTiny: DecoderTiny (conv, then per level AutoencoderTinyBlocks,
nearest 2x upsampling and a conv; one width for all levels) with one level per level of the KL VAE, so
it upsamples as much. DecoderTiny soft-clamps its input to +-3 (tanh(x/3)*3); the unscaled KL latents
of shapes-64 have std 2.4 (20% of values beyond 3, up to 12), so by default the export's
`scaling_factor` is 1.0, as TAESD's: it decodes the unit-variance latents the UNet makes, inside its
near-linear range (`scaling_factor=0` in the config takes the KL VAE's instead; equal after 300 steps
on shapes-64). Only the decoder is trained: the encoder is left at its smallest size and random init
(generation never encodes images), so this model's `encode` is meaningless.
No adversarial term (TAESD has one): the world is flat colors, and L1 + edge weight keeps outlines.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file, save_file

from ..common import optimize, to_tensor, train_loop
from ..data import make_pool, pool
from .vae import edge_map, psnr, reconstruction_shapeeval


def build_model(cfg, vae_config) -> AutoencoderTiny:
    """An AutoencoderTiny whose decoder takes the KL VAE's latents and upsamples as much as its decoder."""
    levels = len(vae_config["block_out_channels"])  # the KL decoder upsamples 2 ** (levels - 1)
    if len(cfg.num_blocks) != levels:
        raise ValueError(f"num_blocks needs {levels} entries (one per level of the VAE, 16x16 -> 64x64 for "
                         f"shapes-64); got {tuple(cfg.num_blocks)}")
    if cfg.channels < 1 or any(int(b) < 0 for b in cfg.num_blocks):
        raise ValueError("channels must be >= 1 and num_blocks entries >= 0")
    torch.manual_seed(cfg.seed)
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=vae_config["latent_channels"],
        decoder_block_out_channels=(cfg.channels,) * levels, num_decoder_blocks=tuple(int(b) for b in cfg.num_blocks),
        upsampling_scaling_factor=2, upsample_fn="nearest", act_fn="relu",
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(0,) * levels,  # untrained, kept tiny
        scaling_factor=cfg.scaling_factor or vae_config["scaling_factor"], shift_factor=0.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NCHW."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def encode_mode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Unscaled KL latents (the posterior's mode) of images in [-1, 1]."""
    return torch.cat([vae.encode(images[k:k + batch]).latent_dist.mode() for k in range(0, len(images), batch)])


@torch.no_grad()
def decode(decoder, z_unit: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Unit-variance latents -> images in [-1, 1], exactly as onestep.decode feeds any VAE."""
    factor = decoder.config.scaling_factor
    return torch.cat([decoder.decode(z_unit[k:k + batch] / factor).sample for k in range(0, len(z_unit), batch)])


@torch.no_grad()
def make_data(cfg, vae: AutoencoderKL) -> dict:
    """Unit-variance latents of pool images (a share perturbed) and the KL decoder's images of them."""
    images, _ = pool(cfg.data_size, seed=cfg.seed)
    images = images[:cfg.num_latents]
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    n = len(images)
    sigma = torch.rand(n, generator=gen) * cfg.perturb_sigma * (torch.rand(n, generator=gen) < cfg.perturb_fraction)
    latents, targets = [], []
    for k in range(0, n, 64):
        z = encode_mode(vae, to_tensor(images[k:k + 64])) * vae.config.scaling_factor
        z = z + sigma[k:k + 64].view(-1, 1, 1, 1) * torch.randn(z.shape, generator=gen)
        latents.append(z)
        targets.append(to_uint8(decode(vae, z)))
    return {"latents": torch.cat(latents).contiguous(), "targets": torch.cat(targets).contiguous(), "sigma": sigma}


def load_data(cfg, vae: AutoencoderKL) -> dict:
    """make_data, cached in the run folder so a resume skips the KL encoder and decoder."""
    cache = Path(cfg.run_dir) / "latents.safetensors"
    if cache.is_file():
        return load_file(str(cache))
    data = make_data(cfg, vae)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(".latents.tmp.safetensors")
    save_file(data, str(tmp))
    tmp.replace(cache)
    return data


def loss_fn(tiny: AutoencoderTiny, latents: torch.Tensor, targets: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """The distillation loss of one batch: unit-variance latents, uint8 KL-decoder targets."""
    target = targets.float() / 127.5 - 1
    diff = tiny.decode(latents / tiny.config.scaling_factor).sample - target
    weight = 1 + edge_weight * edge_map(target) if edge_weight else 1.0
    return (weight * (diff.abs() + diff ** 2)).mean()


def train(cfg) -> dict:
    if not cfg.vae_dir:
        raise ValueError("vae_dir is required: the AutoencoderKL folder whose decoder is distilled")
    if cfg.threads:  # train_loop sets it too, but the KL encoder and decoder run before it
        torch.set_num_threads(cfg.threads)
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, use_safetensors=True, dtype=torch.float32)
    vae.eval().requires_grad_(False)
    tiny = build_model(cfg, vae.config)
    tiny.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = load_data(cfg, vae)
    latents, targets = data["latents"], data["targets"]
    rng = np.random.default_rng(cfg.seed + 3)

    def step(_):
        idx = torch.from_numpy(rng.integers(len(latents), size=cfg.batch_size))
        loss = loss_fn(tiny, latents[idx], targets[idx], cfg.edge_weight)
        optimize(opt, loss, tiny.decoder.parameters())
        return {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]}

    result = train_loop(cfg, {"tiny_decoder": tiny}, {"tiny_decoder": opt}, step)
    tiny.eval()
    result.update(model=tiny, vae=vae)
    return result


@torch.no_grad()
def evaluate(tiny: AutoencoderTiny, vae: AutoencoderKL, n: int = 512, seed: int = 30_000) -> dict:
    """Both decoders on the KL latents of n fresh renders: PSNR to the renders, ShapeEval pass rate of
    the decoded images against the renders' prompts, and PSNR of the tiny decoder to the KL decoder."""
    images, prompts = make_pool(n, seed=seed)
    x = to_tensor(images)
    z = encode_mode(vae, x) * vae.config.scaling_factor
    full, small = decode(vae, z).clamp(-1, 1), decode(tiny, z).clamp(-1, 1)
    return {"vae_psnr_db": float(psnr(full, x).mean()), "vae_shapeeval": reconstruction_shapeeval(full, prompts),
            "tiny_psnr_db": float(psnr(small, x).mean()), "tiny_shapeeval": reconstruction_shapeeval(small, prompts),
            "tiny_vs_vae_psnr_db": float(psnr(small, full).mean()), "eval_images": n}


def export(tiny: AutoencoderTiny, out_dir: str | Path) -> Path:
    """A standard AutoencoderTiny folder (config.json + safetensors; under 1 MB in fp32)."""
    tiny.save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)
