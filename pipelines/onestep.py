"""One- to four-step generation for UNet students (SD and SDXL families), and plain generation for
SANA and FLUX through their own pipelines.

Each step predicts the clean latent from the noisy one with the scheduler's parameterisation
(epsilon, v or sample), and between steps re-noises it to the next timestep with fresh noise
(the multistep sampler of consistency models and DMD2's backward simulation):

    x0_k = f(x_{t_k}, t_k, c),   x_{t_{k+1}} = sqrt(abar_{t_{k+1}}) x0_k + sqrt(1 - abar_{t_{k+1}}) eps_k.

`denoise` is differentiable: gradients flow from the image back to the initial noise (ReNO uses it).
`generate` wraps it with no_grad, timing per stage, seeds and input checks.

A negative prompt works in one of two ways (`negative_mode`): "nasa" (the default) subtracts the
negative prompt's cross-attention output inside the one forward pass (`nasa.py`); "cfg" is the
baseline that extrapolates the clean-latent predictions of two passes, x0 = x0_neg + w (x0_pos - x0_neg).
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import nasa
from .registry import DEFAULT_NASA_ALPHA, ModelSpec

MAX_PROMPT_CHARS = 1000
MAX_BATCH = 16
MAX_SEED = 2**32 - 1
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STUDENT_STEPS = 4
NEGATIVE_MODES = ("nasa", "cfg")


@dataclass
class Conditioning:
    """Text conditioning for a UNet call (SDXL adds pooled embeddings and size ids)."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None

    def repeat(self, n: int) -> "Conditioning":
        if n == 1:
            return self
        extra = {k: v.repeat_interleave(n, 0) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return Conditioning(self.prompt_embeds.repeat_interleave(n, 0), extra)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    timings: dict  # seconds: text_encoding, denoising, decoding, total
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # engine ("torch" / "onnx"), prompt cache "hit" / "miss" / "off"
    notice: str = ""  # one line for the timing line, e.g. why the ONNX engine was not used


class PromptCache:
    """LRU of text conditionings keyed by (model, prompt, height, width, device, dtype).

    Live typing asks for the same prompt again and again (every seed, every batch, the negative
    prompt), and a cached embedding skips the text encoder. An entry also remembers which text encoder
    made it (a weak reference): a reloaded or retrained model with the same id is a miss, never a stale
    hit. `clear(model)` drops one model's entries, `clear()` all."""

    def __init__(self, size: int = 128):  # an SDXL entry is ~0.3 MB (77 x 2048 fp16)
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, owner):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is owner:
                self._entries.move_to_end(key)
                return entry[1]
            return None

    def put(self, key: tuple, owner, value) -> None:
        with self._lock:
            self._entries[key] = (weakref.ref(owner), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self, model: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._entries if model is None or k[0] == model]:
                del self._entries[key]


PROMPT_CACHE = PromptCache()


def check_inputs(prompt: str, steps: int, height: int, width: int, seed: int, batch_size: int,
                 max_steps: int = MAX_STUDENT_STEPS) -> None:
    """Raise ValueError with one line saying what is wrong and what is allowed."""
    if not isinstance(prompt, str):
        raise ValueError("prompt must be text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    for name, value, lo, hi in (("steps", steps, 1, max_steps), ("batch size", batch_size, 1, MAX_BATCH),
                                ("seed", seed, 0, MAX_SEED), ("height", height, MIN_SIDE, MAX_SIDE),
                                ("width", width, MIN_SIDE, MAX_SIDE)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {str(value)[:40]!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{name} {value} is out of range; allowed: {lo} to {hi}")
    for name, value in (("height", height), ("width", width)):
        if value % 8:
            raise ValueError(f"{name} {value} is not a multiple of 8; allowed: multiples of 8 from {MIN_SIDE} to {MAX_SIDE}")


def check_negative(negative_mode: str, nasa_alpha) -> None:
    """Raise a one-line ValueError for a negative mode or NASA alpha outside what is allowed."""
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"negative mode {str(negative_mode)[:40]!r} is not supported; allowed: {', '.join(NEGATIVE_MODES)}")
    if nasa_alpha is not None:
        nasa.check_alpha(nasa_alpha)


def default_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced trailing timesteps: 1 -> [999], 4 -> [999, 749, 499, 249]."""
    return [int(num_train_timesteps - 1 - k * num_train_timesteps // steps) for k in range(steps)]


def resolve_timesteps(spec: ModelSpec, steps: int, timesteps=None, num_train_timesteps: int = 1000) -> list[int]:
    ts = list(timesteps) if timesteps is not None else spec.timesteps_for(steps) or default_timesteps(steps, num_train_timesteps)
    if len(ts) != steps or any(not 0 <= t < num_train_timesteps for t in ts):
        raise ValueError(f"timesteps {ts} must be {steps} values in [0, {num_train_timesteps - 1}]")
    return ts


def latent_shape(pipe, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = pipe.vae_scale_factor
    return (batch, pipe.unet.config.in_channels, height // f, width // f)


def make_noise(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Initial noise, one CPU generator per image (image i of a batch is reproducible from its seed alone)."""
    return seeded_noise(seeds, latent_shape(pipe, 1, height, width))


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One (1, C, h, w) draw per seed from its own CPU generator, concatenated (also the ONNX engine's noise)."""
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's first floating-point parameter. diffusers' `.device` and `.dtype`
    walk every submodule looking for offload and casting hooks: about a millisecond each on the
    shapes UNet, several per generation, which live typing at tens of images per second notices."""
    p = next(p for p in module.parameters() if p.is_floating_point())
    return p.device, p.dtype


def encode_prompt(pipe, prompts: list[str], height: int, width: int) -> Conditioning:
    """Text conditioning with gradients allowed (no no_grad here: ReNO may differentiate through it)."""
    device = placement(pipe.unet)[0]
    if hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, pooled embeds and size ids
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)})
    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return Conditioning(embeds)


def cached_prompt(pipe, model: str, prompt: str, height: int, width: int, use_cache: bool = True) -> tuple[Conditioning, str]:
    """The conditioning of one prompt through PROMPT_CACHE: (conditioning, "hit" | "miss" | "off")."""
    if not use_cache:
        return encode_prompt(pipe, [prompt], height, width), "off"
    owner = pipe.text_encoder_2 if getattr(pipe, "text_encoder_2", None) is not None else pipe.text_encoder
    key = (model, prompt, height, width, *map(str, placement(pipe.unet)))
    cond = PROMPT_CACHE.get(key, owner)
    if cond is not None:
        return cond, "hit"
    with torch.no_grad():
        cond = encode_prompt(pipe, [prompt], height, width)
    PROMPT_CACHE.put(key, owner, cond)
    return cond, "miss"


def predict_x0(pipe, model_output: torch.Tensor, x_t: torch.Tensor, t: int, prediction_type: str) -> torch.Tensor:
    abar = pipe.scheduler.alphas_cumprod[t].to(x_t.device, torch.float32)
    return x0_from(abar, model_output, x_t, prediction_type)


def x0_from(abar: torch.Tensor, model_output: torch.Tensor, x_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean latent implied by a UNet output at noise level abar (a scalar, or per sample (B, 1, 1, 1))."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a.clamp_min(1e-4)
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction type {prediction_type!r} is not supported; allowed: epsilon, v_prediction, sample")


def denoise(pipe, cond: Conditioning, noise: torch.Tensor, timesteps: list[int], prediction_type: str | None = None,
            generator: torch.Generator | None = None, renoise: list[torch.Tensor] | None = None,
            negative: Conditioning | None = None, guidance_scale: float = 1.0, negative_mode: str = "nasa",
            nasa_alpha: float | None = None, control=None, nasa_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable student sampling: initial noise -> clean latents (scaled, as the UNet sees them).

    Re-noising between steps uses `renoise[k]` when given (so a caller can fix it), else noise drawn
    from `generator`. With `negative` and negative_mode "nasa", every UNet call steers away from it in
    cross-attention with strength `nasa_alpha` (None: DEFAULT_NASA_ALPHA; its batch may be 1 for all
    images); with "cfg", the baseline: the clean-latent predictions of the two prompts are extrapolated,
    x0 = x0_neg + w (x0_pos - x0_neg); `nasa_mask` (1, tokens) limits NASA to some of the negative's tokens
    (nasa.words_mask). `control` (a control.Control: a ControlNet or an NCT adapter with
    its map and scale) adds its residuals to every UNet call."""
    nasa_alpha = DEFAULT_NASA_ALPHA if nasa_alpha is None else nasa_alpha
    check_negative(negative_mode, nasa_alpha)
    ptype = prediction_type or pipe.scheduler.config.prediction_type
    unet = pipe.unet
    device, dtype = placement(unet)
    x = noise.to(device, dtype)
    use_nasa = negative is not None and negative_mode == "nasa"
    with nasa.applied(unet, negative.prompt_embeds, nasa_alpha, nasa_mask) if use_nasa else nullcontext():
        return _sample(pipe, cond, x, timesteps, ptype, generator, renoise, None if use_nasa else negative,
                       guidance_scale, control)


def _unet(pipe, x, t_batch, cond, control):
    extra = control.residuals(x, t_batch, cond) if control is not None else {}
    return pipe.unet(x, t_batch, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs,
                     **extra).sample


def _sample(pipe, cond, x, timesteps, ptype, generator, renoise, negative, guidance_scale, control) -> torch.Tensor:
    x0 = x
    for k, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = _unet(pipe, x, t_batch, cond, control)
        x0 = predict_x0(pipe, out.float(), x.float(), t, ptype)
        if negative is not None:
            out_neg = _unet(pipe, x, t_batch, negative, control)
            x0_neg = predict_x0(pipe, out_neg.float(), x.float(), t, ptype)
            x0 = x0_neg + guidance_scale * (x0 - x0_neg)
        if k + 1 < len(timesteps):
            nxt = timesteps[k + 1]
            abar = pipe.scheduler.alphas_cumprod[nxt].to(x.device, torch.float32)
            eps = renoise[k] if renoise is not None else torch.randn(x.shape, generator=generator)
            x = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps.to(x.device, torch.float32)).to(x.dtype)
    return x0


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (differentiable)."""
    vae = pipe.vae
    return vae.decode(latents.to(placement(vae)[1]) / vae.config.scaling_factor).sample.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def resolve_request(spec: ModelSpec, prompt: str, negative_prompt: str, steps, seed: int, batch_size: int, height,
                    width, negative_mode: str, nasa_alpha) -> tuple[int, int, int, float]:
    """Defaults from the spec and every input check of `generate`: (steps, height, width, nasa_alpha)."""
    steps = spec.steps if steps is None else steps
    height = spec.resolution if height is None else height
    width = spec.resolution if width is None else width
    nasa_alpha = spec.nasa_alpha if nasa_alpha is None else nasa_alpha
    check_inputs(prompt, steps, height, width, seed, batch_size, max_steps=max(MAX_STUDENT_STEPS, spec.steps))
    if not isinstance(negative_prompt, str):
        raise ValueError("negative prompt must be text")
    if len(negative_prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"negative prompt is {len(negative_prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    check_negative(negative_mode, nasa_alpha)
    return steps, height, width, nasa_alpha


@torch.no_grad()
def generate(pipe, spec: ModelSpec, prompt: str, *, negative_prompt: str = "", guidance_scale: float = 2.0,
             steps: int | None = None, seed: int = 0, batch_size: int = 1, height: int | None = None,
             width: int | None = None, timesteps=None, noise: torch.Tensor | None = None,
             prediction_type: str | None = None, negative_mode: str = "nasa",
             nasa_alpha: float | None = None, control=None, prompt_cache: bool = True) -> GenerationResult:
    """Generate `batch_size` images (image i from seed + i, or from `noise[i]`); `control` as in `denoise`.

    A negative prompt steers away with NASA at `nasa_alpha` (None: the model's default,
    `spec.nasa_alpha`), or with negative_mode "cfg" through the CFG-style baseline at `guidance_scale`.
    Prompt embeddings come from PROMPT_CACHE unless `prompt_cache` is False."""
    steps, height, width, nasa_alpha = resolve_request(spec, prompt, negative_prompt, steps, seed, batch_size, height,
                                                       width, negative_mode, nasa_alpha)
    if spec.family not in ("sd", "sdxl"):
        return _generate_other(pipe, spec, prompt, steps, seed, batch_size, height, width)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(batch_size)]
    device = placement(pipe.unet)[0]
    t0 = time.perf_counter()
    cond, cache_state = cached_prompt(pipe, spec.id, prompt, height, width, prompt_cache)
    cond = cond.repeat(batch_size)
    negative = None
    if negative_prompt:  # NASA attends to one negative for the whole batch; CFG runs it per image
        negative, _ = cached_prompt(pipe, spec.id, negative_prompt, height, width, prompt_cache)
        negative = negative if negative_mode == "nasa" else negative.repeat(batch_size)
    sync(device)
    t1 = time.perf_counter()
    if noise is None:
        noise = make_noise(pipe, seeds, height, width)
    elif tuple(noise.shape) != latent_shape(pipe, batch_size, height, width):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {latent_shape(pipe, batch_size, height, width)}")
    ts = resolve_timesteps(spec, steps, timesteps, pipe.scheduler.config.num_train_timesteps)
    gen = torch.Generator().manual_seed(seeds[0] + 1)
    mask = nasa.words_mask(pipe.tokenizer, negative_prompt) if negative_prompt and spec.nasa_words_only else None
    latents = denoise(pipe, cond, noise, ts, prediction_type, generator=gen, negative=negative,
                      guidance_scale=guidance_scale, negative_mode=negative_mode, nasa_alpha=nasa_alpha, control=control,
                      nasa_mask=mask)
    sync(device)
    t2 = time.perf_counter()
    images = decode(pipe, latents)
    sync(device)
    t3 = time.perf_counter()
    timings = {"text_encoding": t1 - t0, "denoising": t2 - t1, "decoding": t3 - t2, "total": t3 - t0}
    settings = request_settings(spec, prompt, negative_prompt, steps, seed, batch_size, height, width, ts,
                                negative_mode, nasa_alpha, guidance_scale)
    return GenerationResult(to_pil(images), timings, settings, {"engine": "torch", "prompt_cache": cache_state})


def request_settings(spec: ModelSpec, prompt, negative_prompt, steps, seed, batch_size, height, width, ts,
                     negative_mode, nasa_alpha, guidance_scale) -> dict:
    """What a PNG carries to reproduce a student's image (the same for every engine)."""
    settings = {"model": spec.id, "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "seed": seed,
                "batch_size": batch_size, "height": height, "width": width, "timesteps": ts}
    if negative_prompt:  # all it takes to reproduce the negative (a PNG restores it)
        settings.update(negative_mode=negative_mode, nasa_alpha=nasa_alpha, guidance_scale=guidance_scale)
    return settings


def _generate_other(pipe, spec, prompt, steps, seed, batch_size, height, width) -> GenerationResult:
    """SANA-Sprint and FLUX: their own pipelines, one seed per image."""
    t0 = time.perf_counter()
    images = []
    for i in range(batch_size):
        out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=spec.guidance_scale, height=height,
                   width=width, generator=torch.Generator().manual_seed(seed + i))
        images.extend(out.images)
    total = time.perf_counter() - t0
    settings = {"model": spec.id, "prompt": prompt, "steps": steps, "seed": seed, "batch_size": batch_size,
                "height": height, "width": width}
    return GenerationResult(images, {"text_encoding": 0.0, "denoising": total, "decoding": 0.0, "total": total}, settings)
