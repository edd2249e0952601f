"""Multi-step teacher sampling with classifier-free guidance (Ho & Salimans, 2022),

    eps_hat = eps(x_t, t, c_neg) + w (eps(x_t, t, c) - eps(x_t, t, c_neg)),

through the teacher's own diffusers pipeline and scheduler, started from the *same* initial noise
as the student (`onestep.make_noise`), so Compare shows one noise through two samplers.
`guidance_rescale` (Lin et al., 2024) counters over-exposure on zero-terminal-SNR schedules.
"""
from __future__ import annotations

import time

import torch

from .onestep import GenerationResult, check_inputs, make_noise, sync, to_pil
from .registry import ModelSpec

MAX_TEACHER_STEPS = 200


@torch.no_grad()
def sample(pipe, spec: ModelSpec, prompt: str, *, negative_prompt: str = "", steps: int | None = None,
           guidance_scale: float | None = None, guidance_rescale: float | None = None, seed: int = 0,
           batch_size: int = 1, height: int | None = None, width: int | None = None,
           noise: torch.Tensor | None = None, control=None) -> GenerationResult:
    """Sample with CFG from `noise` (default: the seeds' noise). `control` (a control.Control) runs the
    teacher's ControlNet through diffusers' ControlNet pipeline built on the same components."""
    steps = spec.steps if steps is None else steps
    height = spec.resolution if height is None else height
    width = spec.resolution if width is None else width
    guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    guidance_rescale = spec.guidance_rescale if guidance_rescale is None else guidance_rescale
    check_inputs(prompt, steps, height, width, seed, batch_size, max_steps=MAX_TEACHER_STEPS)
    if not 0 <= guidance_scale <= 30:
        raise ValueError(f"guidance scale {guidance_scale} is out of range; allowed: 0 to 30")
    if noise is None:
        noise = make_noise(pipe, [seed + i for i in range(batch_size)], height, width)
    device = pipe.unet.device
    cfg = guidance_scale > 1
    t0 = time.perf_counter()
    kwargs = {}
    if hasattr(pipe, "text_encoder_2"):
        pe, ne, pp, npool = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=batch_size,
                                               do_classifier_free_guidance=cfg, negative_prompt=negative_prompt or None)
        kwargs.update(pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npool)
    else:
        pe, ne = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=batch_size,
                                    do_classifier_free_guidance=cfg, negative_prompt=negative_prompt or None)
    if cfg:
        kwargs["negative_prompt_embeds"] = ne
    sync(device)
    t1 = time.perf_counter()
    if control is not None:
        kwargs.update(image=control.image[:1], controlnet_conditioning_scale=control.scale)
        pipe = _with_controlnet(pipe, control.model)
    latents = pipe(prompt_embeds=pe, num_inference_steps=steps, guidance_scale=guidance_scale,
                   guidance_rescale=guidance_rescale, height=height, width=width,
                   latents=noise.to(device, pipe.unet.dtype), output_type="latent", **kwargs).images
    sync(device)
    t2 = time.perf_counter()
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample.float()
    sync(device)
    t3 = time.perf_counter()
    timings = {"text_encoding": t1 - t0, "denoising": t2 - t1, "decoding": t3 - t2, "total": t3 - t0}
    settings = {"model": spec.id, "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size, "height": height,
                "width": width}
    return GenerationResult(to_pil(images), timings, settings)


def _with_controlnet(pipe, controlnet):
    """The same components in diffusers' ControlNet pipeline of the family (SD or SDXL)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionControlNetPipeline
    out = cls.from_pipe(pipe, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out
