"""Teacher: a text-conditioned latent diffusion UNet (Rombach et al., 2022) trained with
v-prediction (Salimans & Ho, 2022) on a zero-terminal-SNR schedule (Lin et al., 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed"):

    z_t = a_t z_0 + s_t eps,   v = a_t eps - s_t z_0,   L = w(t) || v_theta(z_t, t, c) - v ||^2,

with min-SNR-gamma weighting (Hang et al., 2023) floored at SNR 1, w = min(max(SNR, 1), gamma) / (SNR + 1),
so the last timestep (SNR 0: predict the image from pure noise, which sets the background color)
is trained too. The prompt is dropped with probability `uncond_prob` so classifier-free guidance
and negative prompts work. An EMA of the weights is what ships.

Conditioning: the last hidden state of the tiny CLIP's text tower, prompts padded to the tokenizer's
length without an attention mask -- exactly what `StableDiffusionPipeline.encode_prompt` feeds it.
The tower is frozen unless `text_lr` > 0: then the diffusion loss trains it too. That is for words the
contrastive CLIP placed close together (circle, square and heart were): the UNet followed it and drew
one round blob for all three.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from pipelines import registry
from shapes import judge, sample_spec, to_prompt

from ..common import drop_local_paths, make_accelerator, optimize, save_grid, to_tensor, train_loop
from ..data import pool

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                clip_sample=False, steps_offset=1)


# how an exported teacher folder is served (its onestep.json): as the registry serves the shipped one
_SPEC = registry.MODELS["shapes-64-teacher"]
TEACHER_DEFAULTS = {"role": "teacher", "resolution": _SPEC.resolution, "steps": _SPEC.steps,
                    "guidance_scale": _SPEC.guidance_scale, "guidance_rescale": _SPEC.guidance_rescale}


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP text tower as a standalone CLIPTextModel (the UNet's text encoder)."""
    enc = CLIPTextModel(clip.config.text_config)
    # transformers 5 puts the transformer's parts on CLIPTextModel itself; older versions nest them
    getattr(enc, "text_model", enc).load_state_dict(clip.text_model.state_dict())
    return enc.eval()


def build_unet(cfg, cross_attention_dim: int, latent_channels: int) -> UNet2DConditionModel:
    """The innermost `cfg.cross_attention_levels` levels get (self- and cross-) attention blocks."""
    torch.manual_seed(cfg.seed)
    levels = len(cfg.block_out_channels)
    if not 0 <= cfg.cross_attention_levels <= levels:
        raise ValueError(f"cross_attention_levels={cfg.cross_attention_levels}: allowed 0 to {levels} (the UNet's levels)")
    attn = [k >= levels - cfg.cross_attention_levels for k in range(levels)]
    return UNet2DConditionModel(
        sample_size=16, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.block_out_channels), cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=16)


def schedule(snr_shift: float = 1.0) -> dict:
    """The scheduler settings; `snr_shift` s != 1 multiplies every timestep's SNR by s (adds log s to
    log-SNR, as Hoogeboom et al., 2023, "simple diffusion", shift schedules between resolutions), kept
    as the schedule's `trained_betas` so any diffusers scheduler and the students read the same one.
    SD's schedule is made for 64x64 latents; on 16x16 ones the same SNR leaves far less of the image
    (two thirds of its timesteps have SNR < 1). s = (64/16)^2 = 16 is what that resolution argument
    suggests; `python -m training.recipes.probe` measures whether it helps."""
    if snr_shift == 1.0:
        return dict(SCHEDULE)
    ac = DDPMScheduler(**SCHEDULE).alphas_cumprod.double()
    shifted = snr_shift * ac / (1 - ac).clamp_min(1e-20)
    ac_new = shifted / (1 + shifted)  # the zero terminal SNR stays zero
    betas = 1 - ac_new / torch.cat([torch.ones(1, dtype=ac_new.dtype), ac_new[:-1]])
    return {**SCHEDULE, "trained_betas": betas.clamp(0, 1).tolist(), "rescale_betas_zero_snr": False}


def sampling_scheduler(snr_shift: float = 1.0) -> DDIMScheduler:
    return DDIMScheduler(**schedule(snr_shift), set_alpha_to_one=True)


def make_pipeline(unet, vae, text_encoder, tokenizer, snr_shift: float = 1.0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sampling_scheduler(snr_shift), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Scaled latent means of uint8 NHWC images, computed on the VAE's device and returned on the CPU."""
    out = []
    for k in range(0, len(images), batch):
        x = to_tensor(images[k:k + batch]).to(vae.device)
        out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def cached_latents(vae: AutoencoderKL, images: np.ndarray, path: Path) -> torch.Tensor:
    """`encode_latents`, computed once per run and kept beside it (safetensors), so a resume skips it
    (a cache of another number of images is made again)."""
    if path.is_file():
        latents = load_file(str(path))["latents"]
        if len(latents) == len(images):
            return latents
    latents = encode_latents(vae, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one run may race: last rename wins
    save_file({"latents": latents.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return latents


@torch.no_grad()
def quick_eval(pipe: StableDiffusionPipeline, n: int, seed: int, steps: int = 20, guidance: float = 5.0):
    """ShapeEval pass rate of n teacher samples of random prompts, and the images."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, category=None) for _ in range(n)]
    images = pipe([to_prompt(s) for s in specs], num_inference_steps=steps, guidance_scale=guidance,
                  guidance_rescale=0.7, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    images = (images * 255).round().astype(np.uint8)
    return float(np.mean([judge(s, im)[0] for s, im in zip(specs, images)])), images


def train(cfg) -> dict:
    """Train on the device accelerate picks (a GPU when there is one); `accelerate launch` runs it on
    several, each process drawing its own batches."""
    acc = make_accelerator(cfg)
    device = acc.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clip = CLIPModel.from_pretrained(cfg.clip_dir, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(cfg.clip_dir)
    text_encoder = (CLIPTextModel.from_pretrained(cfg.init_text_encoder, use_safetensors=True, dtype=torch.float32)
                    if cfg.init_text_encoder else text_encoder_from_clip(clip)).requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, use_safetensors=True).eval().requires_grad_(False).to(device)
    unet = build_unet(cfg, text_encoder.config.hidden_size, vae.config.latent_channels)
    if cfg.init_unet:  # warm start from an exported EMA (a checkpoint in run_dir still wins)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(cfg.init_unet, use_safetensors=True,
                                                                  dtype=torch.float32).state_dict())
    unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet_w, opt = acc.prepare(unet, opt)
    modules, optimizers, opts = {"unet": unet, "ema": ema}, {"unet": opt}, [opt]
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    text_ema = text_encoder
    if cfg.text_lr > 0:  # the text encoder trains too: its own optimizer (LR) and EMA, both in the checkpoint
        text_ema = copy.deepcopy(text_encoder)
        text_encoder.train().requires_grad_(True)
        text_opt = torch.optim.AdamW(text_encoder.parameters(), lr=cfg.text_lr, weight_decay=cfg.weight_decay)
        text_w, text_opt = acc.prepare(text_encoder, text_opt)
        modules.update(text_encoder=text_encoder, text_ema=text_ema)
        optimizers["text_encoder"] = text_opt
        opts.append(text_opt)
        ema_params += list(text_ema.parameters())
        params += list(text_encoder.parameters())
    noise_sched = DDPMScheduler(**{**schedule(cfg.snr_shift), "num_train_timesteps": cfg.num_train_timesteps})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas).clamp_min(1e-8)
    weight = (snr.clamp(min=1.0, max=cfg.snr_gamma) / (snr + 1)).to(device)

    images, prompts = pool(cfg.data_size, seed=cfg.seed + 7)
    latents = cached_latents(vae, images, Path(cfg.run_dir) / "latents.safetensors").to(device)
    # every pool prompt (and the empty one, last) encoded once: no tokenizer or text encoder in the step
    unique = sorted(set(prompts))
    row = {p: k for k, p in enumerate(unique)}
    prompt_rows = torch.tensor([row[p] for p in prompts], device=device)
    if cfg.text_lr > 0:  # token ids, encoded in every step
        token_ids = tokenizer(unique + [""], padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)
    else:  # encoded once: no tokenizer or text encoder in the step
        embeds = torch.cat([encode_text(text_encoder, tokenizer, unique[k:k + 512])
                            for k in range(0, len(unique), 512)] + [encode_text(text_encoder, tokenizer, [""])])
    rng = np.random.default_rng(cfg.seed + 3 + 7919 * acc.process_index)
    gen = torch.Generator(device).manual_seed(cfg.seed + 4 + 7919 * acc.process_index)

    def step(i):
        idx = torch.from_numpy(rng.integers(len(prompts), size=cfg.batch_size)).to(device)
        z0 = latents[idx]
        dropped = torch.from_numpy(rng.random(cfg.batch_size) < cfg.uncond_prob).to(device)
        rows = torch.where(dropped, len(unique), prompt_rows[idx])
        cond = text_w(token_ids[rows])[0] if cfg.text_lr > 0 else embeds[rows]
        noise = torch.randn(z0.shape, generator=gen, device=device)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen, device=device)
        zt = noise_sched.add_noise(z0, noise, t)
        target = noise_sched.get_velocity(z0, noise, t)
        pred = unet_w(zt, t, cond).sample
        loss = (weight[t] * F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))).mean()
        optimize(opts, loss, params, accelerator=acc)
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        return {"loss": loss.detach(), "lr": opt.param_groups[0]["lr"]}  # no sync: read when logged

    def sample(folder: Path, at_step: int):
        ema.eval()
        score, imgs = quick_eval(make_pipeline(ema, vae, text_ema.eval(), tokenizer, cfg.snr_shift), cfg.eval_images,
                                 seed=at_step)
        save_grid(list(imgs), folder / f"step-{at_step:08d}.png")  # atomic: the Train tab may be reading it
        with open(Path(cfg.run_dir) / "metrics.jsonl", "a") as f:
            f.write(f'{{"step": {at_step}, "sample_shapeeval": {score:.4f}}}\n')
        print(f"step {at_step}: quick ShapeEval {score:.3f}", flush=True)

    result = train_loop(cfg, modules, optimizers, step, sample_fn=sample if cfg.eval_images else None,
                        accelerator=acc, new=("text_encoder", "text_ema"))
    result.update(unet=ema, vae=vae, text_encoder=text_ema.eval(), tokenizer=tokenizer, snr_shift=cfg.snr_shift)
    return result


def export(unet, vae, text_encoder, tokenizer, out_dir: str | Path, snr_shift: float = 1.0) -> None:
    """Save the teacher as a standard StableDiffusionPipeline folder (DiffusionPipeline.from_pretrained).
    The UNet and VAE are stored in fp16 (half the bytes in assets/); loading casts them to the run's dtype."""
    half_unet, half_vae = copy.deepcopy(unet).to(torch.float16), copy.deepcopy(vae).to(torch.float16)
    make_pipeline(half_unet, half_vae, text_encoder, tokenizer, snr_shift).save_pretrained(Path(out_dir),
                                                                                        safe_serialization=True)
    drop_local_paths(out_dir)
    # how the registry serves the folder when it is given by path: a multi-step teacher, not a one-step student
    (Path(out_dir) / "onestep.json").write_text(json.dumps(TEACHER_DEFAULTS, indent=2) + "\n")
